/** The respaced diffusion sampler of docs/DESIGN.md section 1, as timar_sdk/sampler.py:
 * x0 prediction, learned-range variance, ADM's respacing. Tables in float64, the per-step
 * arithmetic in float32 (Math.fround after every operation, as numpy's float32 arrays do). */

const f = Math.fround;

/** Python's round(): half to even. */
function roundHalfEven(x) {
  const fl = Math.floor(x), d = x - fl;
  if (d < 0.5) return fl;
  if (d > 0.5) return fl + 1;
  return fl % 2 === 0 ? fl : fl + 1;
}

/** The kept original timesteps (int [steps]), as the authors' space_timesteps keeps them. */
export function respacedTimesteps(steps, numSteps) {
  if (!Number.isInteger(steps) || steps < 1 || steps > numSteps) {
    throw new RangeError(`steps: expected an integer in 1..${numSteps}, got ${steps}`);
  }
  if (steps === 1) return [0];
  const stride = (numSteps - 1) / (steps - 1);
  let cur = 0.0;
  const kept = [];
  for (let i = 0; i < steps; i++) { kept.push(roundHalfEven(cur)); cur += stride; }
  return kept;
}

/**
 * Posterior tables (float64 [S] each, index k = step) of the process whose kept cumulative
 * alphas are alphasCumprod[timesteps].
 * @returns {{timesteps: number[], logBeta: number[], logPostVar: number[], coefX0: number[], coefXt: number[]}}
 */
export function respacedSchedule(alphasCumprod, steps) {
  const timesteps = respacedTimesteps(steps, alphasCumprod.length);
  const ac = timesteps.map((t) => alphasCumprod[t]);
  const acPrev = [1.0, ...ac.slice(0, -1)];
  const beta = ac.map((a, k) => 1.0 - a / acPrev[k]);
  const postVar = beta.map((b, k) => (b * (1.0 - acPrev[k])) / (1.0 - ac[k]));
  const first = postVar.length > 1 ? postVar[1] : beta[0];   // ADM's "clipped" entry 0
  return {
    timesteps,
    logBeta: beta.map(Math.log),
    logPostVar: [first, ...postVar.slice(1)].map(Math.log),
    coefX0: beta.map((b, k) => (b * Math.sqrt(acPrev[k])) / (1.0 - ac[k])),
    coefXt: beta.map((b, k) => ((1.0 - acPrev[k]) * Math.sqrt(1.0 - b)) / (1.0 - ac[k])),
  };
}

/**
 * Sample one turn's motion (normalised space) from the backbone outputs z.
 * @param {(x: Float32Array, t: Float32Array, z: Float32Array, rows: number) => Promise<Float32Array>} denoise
 *   x [rows, D] f32, t [rows] f32, z [rows, Dz] -> [rows, 2 D]
 * @param {Float32Array} z [F, Dz] when cfg == 1, [2F, Dz] (conditional rows, then unconditional) otherwise
 * @param {Float32Array} draws (steps + 1) * F * D normals: start noise, then one [F, D] per step
 * @returns {Promise<Float32Array>} x0 samples [F, D]
 */
export async function sampleTurn(denoise, z, draws, sched, temperature, cfg, frames, dim) {
  const steps = sched.timesteps.length;
  const n = frames * dim;
  const rows = cfg === 1.0 ? frames : 2 * frames;
  let x = Float32Array.from(draws.subarray(0, n));
  const t = new Float32Array(rows);
  const xIn = new Float32Array(rows * dim);
  const cfg32 = f(cfg), temp32 = f(temperature);
  for (let i = 0; i < steps; i++) {
    const k = steps - 1 - i;
    t.fill(sched.timesteps[k]);
    xIn.set(x, 0);
    if (rows !== frames) xIn.set(x, n);
    const out = await denoise(xIn, t, z, rows);           // [rows, 2 dim]
    const lb = f(sched.logBeta[k]), lpv = f(sched.logPostVar[k]);
    const c0 = f(sched.coefX0[k]), cx = f(sched.coefXt[k]);
    const noise = draws.subarray((i + 1) * n, (i + 2) * n);
    const next = new Float32Array(n);
    for (let r = 0; r < frames; r++) {
      const o = r * 2 * dim, u = (frames + r) * 2 * dim;
      for (let d = 0; d < dim; d++) {
        let x0 = out[o + d];
        if (rows !== frames) x0 = f(out[u + d] + f(cfg32 * f(out[o + d] - out[u + d])));
        const frac = f(f(out[o + dim + d] + 1) / 2);
        const logVar = f(f(frac * lb) + f(f(1 - frac) * lpv));
        const j = r * dim + d;
        const mean = f(f(c0 * x0) + f(cx * x[j]));
        next[j] = k === 0 ? mean : f(mean + f(f(f(Math.exp(f(0.5 * logVar))) * noise[j]) * temp32));
      }
    }
    x = next;
  }
  return x;
}
