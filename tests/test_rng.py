"""The portable generator (docs/DESIGN.md 4.1): Philox4x32-10 known answers and the stream rule."""
import math
import time

import numpy as np
import pytest

from timar_sdk.runtime.rng import PhiloxNormal, philox4x32

# Random123 tests/kat_vectors, the "philox4x32 10" lines: counter (c0..c3), key (k0, k1), output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def _words(value: int) -> list[int]:
    return [(value >> (32 * i)) & 0xFFFFFFFF for i in range(4)]


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_known_answers(ctr, key, expected):
    out = philox4x32(np.array([ctr]), key)
    assert out.dtype == np.uint32
    assert out[0].tolist() == list(expected)


def test_kat_batched_matches_rows():
    ctrs = np.array([k[0] for k in KAT])
    out = philox4x32(ctrs, KAT[2][1])
    assert out[2].tolist() == list(KAT[2][2])
    assert out[0].tolist() == philox4x32(ctrs[:1], KAT[2][1])[0].tolist()


def test_stream_is_blocks_of_counter_under_seed_key():
    seed = (0x299F31D0 << 32) | 0xA4093822  # high word, low word
    g = PhiloxNormal(seed)
    g.set_state({"seed": seed, "counter": 0x03707344_13198A2E_85A308D3_243F6A88})
    assert g.uniform_u32(4).tolist() == list(KAT[2][2])
    assert g.counter == 0x03707344_13198A2E_85A308D3_243F6A88 + 1
    g0 = PhiloxNormal(0)
    assert g0.uniform_u32(4).tolist() == list(KAT[0][2])


def test_seed_above_2_32_uses_high_word():
    lo = PhiloxNormal(5).uniform_u32(8)
    hi = PhiloxNormal(5 + (7 << 32)).uniform_u32(8)
    assert not np.array_equal(lo, hi)
    want = philox4x32(np.array([_words(0), _words(1)]), (5, 7)).reshape(-1)
    assert np.array_equal(hi, want)
    with pytest.raises(ValueError):
        PhiloxNormal(1 << 64)
    with pytest.raises(ValueError):
        PhiloxNormal(-1)


def test_counter_carries_across_words_and_wraps():
    g = PhiloxNormal(3)
    start = (1 << 64) - 1
    g.set_state({"seed": 3, "counter": start})
    got = g.uniform_u32(12)
    want = philox4x32(np.array([_words(start + i) for i in range(3)]), (3, 0)).reshape(-1)
    assert np.array_equal(got, want)
    g.set_state({"seed": 3, "counter": (1 << 128) - 1})
    got = g.uniform_u32(8)
    want = philox4x32(np.array([_words((1 << 128) - 1), _words(0)]), (3, 0)).reshape(-1)
    assert np.array_equal(got, want)
    assert g.counter == 1


def test_normals_match_scalar_box_muller():
    seed = 0xDEADBEEF12345
    x = PhiloxNormal(seed).uniform_u32(12).tolist()
    want = []
    for a, b in zip(x[0::2], x[1::2]):
        u1, u2 = ((a >> 8) + 0.5) / 2**24, ((b >> 8) + 0.5) / 2**24
        r = math.sqrt(-2.0 * math.log(u1))
        want += [r * math.cos(2 * math.pi * u2), r * math.sin(2 * math.pi * u2)]
    got = PhiloxNormal(seed).normal(11)  # odd count: 3 blocks, last value discarded
    assert got.dtype == np.float32
    assert np.array_equal(got, np.float32(want[:11]))


def test_counter_advance_rule():
    g = PhiloxNormal(1)
    g.normal(0)
    assert g.counter == 0
    for n, blocks in [(1, 1), (4, 1), (5, 2), (1400, 350), (7, 2)]:
        before = g.counter
        g.normal(n)
        assert g.counter - before == blocks
        before = g.counter
        g.uniform_u32(n)
        assert g.counter - before == blocks
    before = g.counter
    g.normal((3, 2))  # 6 values -> 2 blocks
    assert g.counter - before == 2


def test_split_requests_match_one_request():
    whole = PhiloxNormal(42).normal(1400 + 37)
    g = PhiloxNormal(42)
    parts = np.concatenate([g.normal((25, 56)).reshape(-1), g.normal(37)])
    assert np.array_equal(whole, parts)
    # a non-multiple of 4 discards the rest of its last block: the streams differ afterwards
    g = PhiloxNormal(42)
    a = np.concatenate([g.normal(3), g.normal(5)])
    assert np.array_equal(a[:3], whole[:3]) and not np.array_equal(a[3:], whole[3:8])
    assert np.array_equal(a[3:], whole[4:9])


def test_determinism_and_state_round_trip():
    g = PhiloxNormal(2024)
    first = g.normal((25, 56))
    assert np.array_equal(first, PhiloxNormal(2024).normal((25, 56)))
    assert not np.array_equal(first, PhiloxNormal(2025).normal((25, 56)))
    state = g.get_state()
    assert state == {"seed": 2024, "counter": 350}
    assert all(type(v) is int for v in state.values())
    nxt = g.normal((6, 56))
    h = PhiloxNormal(7)
    h.set_state(state)
    assert np.array_equal(h.normal((6, 56)), nxt)
    assert h.get_state() == g.get_state()


def test_normal_statistics():
    z = PhiloxNormal(123).normal((200, 500)).astype(np.float64)
    assert z.shape == (200, 500) and np.isfinite(z).all()
    assert abs(z.mean()) < 0.01  # 5 sigma for 1e5 samples is 0.016
    assert abs(z.std() - 1.0) < 0.01
    assert abs((z[:, 0::2] * z[:, 1::2]).mean()) < 0.015  # z0, z1 uncorrelated
    u = PhiloxNormal(123).uniform_u32(100_000).astype(np.float64) / 2**32
    assert abs(u.mean() - 0.5) < 0.005


def test_speed_10k_normals():
    g = PhiloxNormal(9)
    best = min(_timed(lambda: g.normal(10_000)) for _ in range(5))
    assert best < 5e-3, f"{best * 1e3:.2f} ms"


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t
