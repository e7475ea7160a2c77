/**
 * The portable generator of docs/DESIGN.md 4.1: Philox4x32-10 + Box-Muller, bit for bit the
 * stream of timar_sdk/runtime/rng.py (the specification is that module's docstring).
 *
 * 32-bit words are JS numbers in [0, 2^32); the 32x32 -> 64-bit product is split into 16-bit
 * halves so no intermediate leaves the exact range of a double. The 128-bit counter is a BigInt.
 */

const M0 = 0xD2511F53;
const M1 = 0xCD9E8D57;
const W0 = 0x9E3779B9;
const W1 = 0xBB67AE85;
const U64 = (1n << 64n) - 1n;
const U128 = (1n << 128n) - 1n;
const TWO_PI = 2.0 * Math.PI;

/** High 32 bits of the 64-bit product of two uint32 values. */
function mulhi(a, b) {
  const al = a & 0xffff, ah = a >>> 16, bl = b & 0xffff, bh = b >>> 16;
  const lh = al * bh, hl = ah * bl;
  const mid = ((al * bl) >>> 16) + (lh & 0xffff) + (hl & 0xffff);
  return (ah * bh + Math.floor(lh / 65536) + Math.floor(hl / 65536) + Math.floor(mid / 65536)) >>> 0;
}

/**
 * One Philox4x32-R block.
 * @param {number[]} c counter words c0..c3 (c0 least significant), each in [0, 2^32)
 * @param {number} k0 @param {number} k1 key words
 * @param {Uint32Array} out receives the four outputs at `at`
 */
export function philoxBlock(c, k0, k1, out, at = 0, rounds = 10) {
  let c0 = c[0] >>> 0, c1 = c[1] >>> 0, c2 = c[2] >>> 0, c3 = c[3] >>> 0;
  for (let r = 0; r < rounds; r++) {
    if (r) { k0 = (k0 + W0) >>> 0; k1 = (k1 + W1) >>> 0; }
    const hi0 = mulhi(M0, c0), lo0 = Math.imul(M0, c0) >>> 0;
    const hi1 = mulhi(M1, c2), lo1 = Math.imul(M1, c2) >>> 0;
    c0 = (hi1 ^ c1 ^ k0) >>> 0; c1 = lo1; c2 = (hi0 ^ c3 ^ k1) >>> 0; c3 = lo0;
  }
  out[at] = c0; out[at + 1] = c1; out[at + 2] = c2; out[at + 3] = c3;
}

function toBigInt(value, name, max) {
  let v;
  if (typeof value === 'bigint') v = value;
  else if (typeof value === 'number' && Number.isSafeInteger(value)) v = BigInt(value);
  else if (typeof value === 'string' && /^[0-9]+$/.test(value)) v = BigInt(value);
  else throw new RangeError(`${name} must be an integer, got ${String(value)}`);
  if (v < 0n || v > max) throw new RangeError(`${name} must be in [0, 2^${max === U64 ? 64 : 128}), got ${v}`);
  return v;
}

/** Counter-based generator of float32 standard normals, the stream of Python's PhiloxNormal. */
export class PhiloxNormal {
  static NAME = 'philox4x32-10-boxmuller';

  /** @param {number|bigint|string} seed integer in [0, 2^64) */
  constructor(seed) { this._set(seed, 0n); }

  _set(seed, counter) {
    this.seed = toBigInt(seed, 'seed', U64);
    this.counter = toBigInt(counter, 'counter', U128);
    this._k0 = Number(this.seed & 0xffffffffn);
    this._k1 = Number(this.seed >> 32n);
  }

  /** @returns {{seed: bigint, counter: bigint}} everything needed to resume the stream */
  getState() { return { seed: this.seed, counter: this.counter }; }

  /** @param {{seed: bigint|number|string, counter: bigint|number|string}} state */
  setState(state) { this._set(state.seed, state.counter); }

  /** Outputs of the next `nblocks` blocks (Uint32Array [4 * nblocks]); advances the counter. */
  _blocks(nblocks) {
    const out = new Uint32Array(4 * nblocks);
    const c = [0, 1, 2, 3].map((i) => Number((this.counter >> BigInt(32 * i)) & 0xffffffffn));
    for (let b = 0; b < nblocks; b++) {
      philoxBlock(c, this._k0, this._k1, out, 4 * b);
      for (let i = 0; i < 4; i++) {          // counter + 1 mod 2^128, carrying word by word
        c[i] = (c[i] + 1) >>> 0;
        if (c[i] !== 0) break;
      }
    }
    this.counter = (this.counter + BigInt(nblocks)) & U128;
    return out;
  }

  /** Next n raw 32-bit outputs (Uint32Array [n]); consumes ceil(n / 4) blocks. */
  uniformU32(n) {
    if (!Number.isInteger(n) || n < 0) throw new RangeError(`n must be >= 0, got ${n}`);
    return this._blocks(Math.ceil(n / 4)).subarray(0, n);
  }

  /** n standard normals (Float32Array [n], row-major for any shape); consumes ceil(n / 4) blocks. */
  normal(n) {
    if (!Number.isInteger(n) || n < 0) throw new RangeError(`n must be >= 0, got ${n}`);
    const x = this._blocks(Math.ceil(n / 4));
    const z = new Float32Array(x.length);
    for (let i = 0; i < x.length; i += 2) {
      const u1 = ((x[i] >>> 8) + 0.5) * (1.0 / 16777216);
      const u2 = ((x[i + 1] >>> 8) + 0.5) * (1.0 / 16777216);
      const r = Math.sqrt(-2.0 * Math.log(u1));
      const theta = TWO_PI * u2;
      z[i] = r * Math.cos(theta);
      z[i + 1] = r * Math.sin(theta);
    }
    return z.subarray(0, n);
  }
}
