/** The optional causal smoothing of the output, as timar_sdk/runtime/smoothing.py: per region
 * (expression 0..49, jaw 50..52, neck 53..55) a one-pole low-pass in float32,
 * y[t] = y[t-1] + a (x[t] - y[t-1]), a = 1 - exp(-1 / (fps tau)); tau = 0 leaves a region exact;
 * the first frame of a conversation passes through; the state is the last output frame. */
import { TimarInputError, pyRepr } from './errors.js';

export const REGIONS = { expression: [0, 50], jaw: [50, 53], neck: [53, 56] };
export const MAX_TAU_SECONDS = 2.0;
const SORTED = Object.keys(REGIONS).sort();

/** A smoothing setting as {region: tau seconds}: false, or an object naming some regions. */
export function checkSmoothing(value, name = 'smoothing') {
  const taus = { expression: 0.0, jaw: 0.0, neck: 0.0 };
  if (value === false) return taus;
  if (value === null || typeof value !== 'object' || Array.isArray(value)
      || !Object.keys(value).every((k) => k in REGIONS)) {
    throw new TimarInputError(`${name}: expected False or a dict of time constants in seconds for `
      + `${pyRepr(SORTED)}, got ${pyRepr(value)}`);
  }
  for (const [region, tau] of Object.entries(value)) {
    if (typeof tau !== 'number' || !Number.isFinite(tau) || tau < 0 || tau > MAX_TAU_SECONDS) {
      throw new TimarInputError(`${name}: ${region}: expected a time constant in seconds in `
        + `[0, ${MAX_TAU_SECONDS}], got ${pyRepr(tau)}`);
    }
    taus[region] = tau;
  }
  return taus;
}

/** Per-dimension a, Float32Array [56]; null when every tau is 0 (smoothing off). */
export function filterCoefficients(taus, fps, dim = 56) {
  if (!Object.values(taus).some((t) => t > 0)) return null;
  const a = new Float32Array(dim).fill(1);
  for (const [region, [lo, hi]] of Object.entries(REGIONS)) {
    if (taus[region] > 0) a.fill(1.0 - Math.exp(-1.0 / (fps * taus[region])), lo, hi);
  }
  return a;
}

/**
 * Filter one turn's motion [F * dim] given the last output frame before it (null at the start).
 * @returns {[Float32Array, Float32Array|null]} smoothed motion and its last frame
 */
export function smooth(motion, previous, a, dim = 56) {
  if (a === null || motion.length === 0) return [motion, previous];
  const out = new Float32Array(motion.length);
  const y = Float32Array.from(previous === null ? motion.subarray(0, dim) : previous);
  for (let t = 0; t < motion.length / dim; t++) {
    for (let d = 0; d < dim; d++) {
      const x = motion[t * dim + d];
      y[d] = a[d] === 1 ? x : Math.fround(y[d] + Math.fround(a[d] * Math.fround(x - y[d])));
      out[t * dim + d] = y[d];
    }
  }
  return [out, y];
}
