"""The portable generator of docs/DESIGN.md 4.1: Philox4x32-10 + Box-Muller, numpy only.

Every runtime (Python, C++, Unity) draws the sampler's noise from this generator so the same seed
gives the same motion everywhere. The stream is defined bit for bit below; a port must match it.

**Philox4x32-10** (Salmon et al., SC'11). Counter = four 32-bit words ``c0..c3`` (``c0`` least
significant), key = two words ``k0, k1``. One round, with ``mulhilo(m, x) = (hi32, lo32)`` of the
64-bit product::

    hi0, lo0 = mulhilo(0xD2511F53, c0);  hi1, lo1 = mulhilo(0xCD9E8D57, c2)
    c0, c1, c2, c3 = hi1 ^ c1 ^ k0,  lo1,  hi0 ^ c3 ^ k1,  lo0

10 rounds; after each of the first 9 the key is bumped: ``k0 += 0x9E3779B9, k1 += 0xBB67AE85``
(mod 2^32). The block's four outputs are ``c0, c1, c2, c3`` in that order.

**Keying and counter.** ``k0 = seed & 0xFFFFFFFF``, ``k1 = seed >> 32`` (seed in [0, 2^64)). The
generator's state is one 128-bit integer ``counter`` (starting at 0); block ``b`` of a request
encrypts ``counter + b`` (mod 2^128), split into words ``c_i = (value >> 32 i) & 0xFFFFFFFF``.

**Counter-advance rule.** Every request consumes whole blocks and advances the counter by the
number of blocks it used, leftovers are discarded:

* ``uniform_u32(n)``: ``ceil(n / 4)`` blocks; returns the first n outputs of the blocks in order.
* ``normal(shape)`` with ``n = prod(shape)`` values: ``ceil(n / 4)`` blocks. Each block
  ``(x0, x1, x2, x3)`` gives four normals: Box-Muller on ``(u(x0), u(x1))`` gives ``z0, z1``,
  on ``(u(x2), u(x3))`` gives ``z0, z1``; order ``[z0(x0,x1), z1(x0,x1), z0(x2,x3), z1(x2,x3)]``.
  The first n are returned (row-major into ``shape``); the rest of the last block is discarded.
* A request of 0 values consumes nothing.

Consequently a request of n values followed by one of m values gives the same numbers as one
request of n + m values whenever n is a multiple of 4 (e.g. one [25, 56] noise array: 1400
normals = 350 blocks).

**Uniforms and normals.** ``u(x) = ((x >> 8) + 0.5) / 2^24`` (in (0, 1), never 0 or 1), then in
float64 ``r = sqrt(-2 ln u1)``, ``z0 = r cos(2 pi u2)``, ``z1 = r sin(2 pi u2)``, cast to float32.
"""
from __future__ import annotations

import math

import numpy as np

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)
_U64 = (1 << 64) - 1
_U128 = (1 << 128) - 1


def philox4x32(counter: np.ndarray, key: tuple[int, int], rounds: int = 10) -> np.ndarray:
    """Philox4x32-R block function.

    Args:
        counter: (N, 4) counter words, c0 first (least significant); integer values < 2^32.
        key: (k0, k1), each in [0, 2^32).
        rounds: number of rounds (10 for Philox4x32-10).
    Returns:
        (N, 4) uint32 outputs.
    """
    c = np.asarray(counter, dtype=np.uint64).reshape(-1, 4)
    c0, c1, c2, c3 = (c[:, i].copy() for i in range(4))
    k0, k1 = int(key[0]) & 0xFFFFFFFF, int(key[1]) & 0xFFFFFFFF
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + _W0) & 0xFFFFFFFF, (k1 + _W1) & 0xFFFFFFFF
        p0 = _M0 * c0  # < 2^64: no overflow
        p1 = _M1 * c2
        c0, c1, c2, c3 = ((p1 >> _SHIFT32) ^ c1 ^ np.uint64(k0), p1 & _MASK32,
                          (p0 >> _SHIFT32) ^ c3 ^ np.uint64(k1), p0 & _MASK32)
    return np.stack([c0, c1, c2, c3], axis=1).astype(np.uint32)


class PhiloxNormal:
    """Counter-based generator of float32 standard normals (docs/DESIGN.md 4.1; rule in module doc).

    Args:
        seed: integer in [0, 2^64); key word 0 = low 32 bits, key word 1 = high 32 bits.
    """

    NAME = "philox4x32-10-boxmuller"
    """Identifier the manifest uses to name this generator."""

    def __init__(self, seed: int) -> None:
        self._set(seed, 0)

    def _set(self, seed: int, counter: int) -> None:
        seed, counter = int(seed), int(counter)
        if not 0 <= seed <= _U64:
            raise ValueError(f"seed must be in [0, 2^64), got {seed}")
        if not 0 <= counter <= _U128:
            raise ValueError(f"counter must be in [0, 2^128), got {counter}")
        self._seed, self._counter = seed, counter
        self._key = (seed & 0xFFFFFFFF, seed >> 32)

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def counter(self) -> int:
        """The 128-bit block counter: index of the next block to be generated."""
        return self._counter

    def get_state(self) -> dict[str, int]:
        """{"seed": int, "counter": int}: everything needed to resume the stream."""
        return {"seed": self._seed, "counter": self._counter}

    def set_state(self, state: dict[str, int]) -> None:
        """Restore a state from get_state() (the seed may differ from the current one)."""
        self._set(state["seed"], state["counter"])

    def _blocks(self, nblocks: int) -> np.ndarray:
        """Outputs of the next nblocks blocks, (nblocks * 4,) uint32; advances the counter."""
        lo, hi = self._counter & _U64, self._counter >> 64
        low = np.uint64(lo) + np.arange(nblocks, dtype=np.uint64)  # wraps mod 2^64
        high = np.uint64(hi) + (low < np.uint64(lo)).astype(np.uint64)  # carry; wraps mod 2^64
        ctr = np.stack([low & _MASK32, low >> _SHIFT32, high & _MASK32, high >> _SHIFT32], axis=1)
        self._counter = (self._counter + nblocks) & _U128
        return philox4x32(ctr, self._key).reshape(-1)

    def uniform_u32(self, n: int) -> np.ndarray:
        """Next n raw 32-bit outputs, (n,) uint32; consumes ceil(n / 4) blocks."""
        n = int(n)
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        return self._blocks(-(-n // 4))[:n]

    def normal(self, shape: int | tuple[int, ...]) -> np.ndarray:
        """Standard normals of the given shape, float32, row-major; consumes ceil(n / 4) blocks."""
        shape = (int(shape),) if np.ndim(shape) == 0 else tuple(int(s) for s in shape)
        if any(s < 0 for s in shape):
            raise ValueError(f"shape must be non-negative, got {shape}")
        n = math.prod(shape)
        x = self._blocks(-(-n // 4))
        u = ((x >> np.uint32(8)).astype(np.float64) + 0.5) * (1.0 / (1 << 24))
        r = np.sqrt(-2.0 * np.log(u[0::2]))
        theta = (2.0 * np.pi) * u[1::2]
        z = np.empty(x.shape[0], dtype=np.float64)
        z[0::2] = r * np.cos(theta)
        z[1::2] = r * np.sin(theta)
        return z[:n].astype(np.float32).reshape(shape)
