/** `Session`: one conversation streamed turn by turn through a `Model`, as the Python
 * `timar_sdk.Session` (docs/DESIGN.md section 4): same inputs, checks, messages, noise and motion.
 *
 *   const model = await Model.load('bundle/');              // URL in a page, folder in Node
 *   const session = new Session(model, { seed: 7 });
 *   const motion = await session.step(userAudio, userMotion, agentAudio);  // Float32Array [25 * 56]
 *
 * Nothing in the session changes until a whole call has succeeded: a bad input, an ORT error or a
 * turn whose result is not finite leaves it as it was. Calls are queued: one turn at a time. */
import { ort } from './model.js';
import { TimarInputError, TimarRuntimeError, formatG, pyRepr } from './errors.js';
import { PhiloxNormal } from './philox.js';
import { TurnRing } from './ring.js';
import { respacedSchedule, sampleTurn } from './sampler.js';
import { checkSmoothing, filterCoefficients, smooth } from './smoothing.js';
import { CFG_RANGE, TEMPERATURE_RANGE } from './bundle.js';

export const AUDIO_LIMIT = 4.0;
export const MOTION_LIMIT = 20.0;
const U64_MAX = (1n << 64n) - 1n;
const OPTIONS = ['seed', 'steps', 'temperature', 'cfg', 'history', 'contextTurns', 'smoothing'];
const DTYPES = new Map([[Float32Array, 'float32'], [Float64Array, 'float64'], [Int16Array, 'int16'],
  [Int8Array, 'int8'], [Uint8Array, 'uint8'], [Uint8ClampedArray, 'uint8'], [Uint16Array, 'uint16'],
  [Int32Array, 'int32'], [Uint32Array, 'uint32'], [BigInt64Array, 'int64'], [BigUint64Array, 'uint64']]);

function checkInteger(name, value, lo, hi) {
  const ok = (typeof value === 'number' && Number.isInteger(value)) || typeof value === 'bigint';
  if (!ok || value < lo || value > hi) throw new TimarInputError(`${name}: expected an integer in ${lo}..${hi}, got ${pyRepr(value)}`);
  return value;
}

function checkReal(name, value, [lo, hi]) {
  if (typeof value !== 'number' || !Number.isFinite(value) || value < lo || value > hi) {
    throw new TimarInputError(`${name}: expected a finite number in ${formatG(lo)}..${formatG(hi)}, got ${pyRepr(value)}`);
  }
  return value;
}

function dtypeOf(a) { return DTYPES.get(a?.constructor); }

/** A waveform as Float32Array, checked as Python's timar_sdk.audio.to_float32 checks it. */
export function toFloat32(audio, name = 'audio') {
  const dtype = dtypeOf(audio);
  if (dtype === undefined) {
    throw new TimarInputError(`${name}: expected a 1-D Float32Array, Float64Array or Int16Array of samples, `
      + `got ${audio === null || audio === undefined ? pyRepr(audio) : audio.constructor?.name ?? typeof audio}`);
  }
  let out;
  if (dtype === 'int16') out = Float32Array.from(audio, (s) => s / 32768);
  else if (dtype === 'float32' || dtype === 'float64') out = Float32Array.from(audio);
  else throw new TimarInputError(`${name}: expected dtype float32, float64 or int16, got ${dtype}`);
  if (out.length === 0) throw new TimarInputError(`${name}: expected at least one sample, got an empty array`);
  let peak = 0;
  for (const s of out) {
    if (!Number.isFinite(s)) throw new TimarInputError(`${name}: expected finite samples, found NaN or Inf`);
    peak = Math.max(peak, Math.abs(s));
  }
  if (peak > AUDIO_LIMIT) {
    throw new TimarInputError(`${name}: expected float samples in [-1, 1] (at most ${formatG(AUDIO_LIMIT)} in `
      + `magnitude), got a sample of magnitude ${formatG(peak, 4)}; pass int16 PCM as int16, or divide it by 32768`);
  }
  return out;
}

export class Session {
  /**
   * @param {import('./model.js').Model} model a loaded Model (shared by any number of sessions)
   * @param {object} [options]
   * @param {number|bigint} [options.seed] Philox seed in [0, 2^64) (default 0)
   * @param {number} [options.steps] 1..num_train_steps; [options.temperature] 0..10; [options.cfg] 0..20
   * @param {'masked'|'feedback'} [options.history]
   * @param {number} [options.contextTurns] past turns kept visible, 0..W-1 (default all)
   * @param {boolean|object|null} [options.smoothing] null/true: the bundle's default; false: off;
   *   or {expression, jaw, neck} time constants in seconds
   * Unset options take the manifest's defaults. Throws TimarInputError naming the option.
   */
  constructor(model, options = {}) {
    if (!model || !model.sessions || !model.bundle) {
      throw new TimarInputError(`model: expected a Model (await Model.load(bundle)), got ${pyRepr(model)}`);
    }
    const unknown = Object.keys(options).filter((k) => !OPTIONS.includes(k));
    if (unknown.length) throw new TimarInputError(`options: unknown ${pyRepr(unknown)}; expected some of ${pyRepr(OPTIONS)}`);
    this.model = model;
    const m = model.bundle.manifest;
    const o = options;
    const seed = checkInteger('seed', o.seed ?? 0, 0, U64_MAX);
    this.seed = BigInt(seed);
    this.steps = checkInteger('steps', o.steps ?? m.sampling.steps, 1, m.diffusion.num_train_steps);
    this.temperature = checkReal('temperature', o.temperature ?? m.sampling.temperature, TEMPERATURE_RANGE);
    this.cfg = checkReal('cfg', o.cfg ?? m.sampling.cfg, CFG_RANGE);
    this.history = o.history ?? m.history;
    if (this.history !== 'masked' && this.history !== 'feedback') {
      throw new TimarInputError(`history: expected 'masked' or 'feedback', got ${pyRepr(o.history)}`);
    }
    const w = m.context_turns;
    this.contextTurns = o.contextTurns === undefined || o.contextTurns === null ? null
      : checkInteger('contextTurns', o.contextTurns, 0, w - 1);
    const s = o.smoothing;
    this.smoothing = s === undefined || s === null || s === true
      ? checkSmoothing(m.smoothing ?? false, 'bundle: manifest.json: smoothing') : checkSmoothing(s);
    this._a = filterCoefficients(this.smoothing, m.fps, model.dim);
    this.schedule = respacedSchedule(m.diffusion.alphas_cumprod, this.steps);
    this.rows = this.cfg === 1.0 ? 1 : 2;
    const c = m.cache;
    this._cacheNames = c.past_key_values_inputs;
    this._cacheDims = [this.rows, c.heads, c.past_key_values_shape[4], c.head_dim];
    this._tokensPerSlot = c.tokens_per_slot;
    this._queue = Promise.resolve();
    this.reset();
  }

  /** Back to a fresh conversation: empty cache and buffers, generator at its seed. */
  reset() {
    const m = this.model.bundle.manifest;
    const size = this._cacheDims.reduce((a, b) => a * b, 1);
    this._cache = this._cacheNames.map(() => new Float32Array(size));
    this._cacheTensors = this._cache.map((a) => new ort.Tensor('float32', a, this._cacheDims));
    this._conv = {
      ring: TurnRing.empty(m.context_turns, m.turn_layout.tokens_per_turn),
      counter: 0n, turns: 0, smoothed: null,
      ua: new Float32Array(0), aa: new Float32Array(0), um: new Float32Array(0), tracked: false, last: null,
    };
  }

  /** Turns committed since the last reset. */
  get turns() { return this._conv.turns; }

  /** The model's facts and this session's settings and state. */
  get info() {
    return { ...this.model.info, history: this.history, seed: this.seed, steps: this.steps,
      temperature: this.temperature, cfg: this.cfg, smoothing: { ...this.smoothing }, turns: this.turns };
  }

  /**
   * Exactly one turn. Audio: [samples_per_turn] Float32Array/Float64Array in [-1, 1] or Int16Array
   * at the bundle's rate; userMotion: Float32Array/Float64Array [frames_per_turn * 56] raw FLAME
   * values (row-major), or null when the user's face is not tracked.
   * Ignores (and keeps) what feed() has buffered. Bad input rejects with TimarInputError at once,
   * before any queued turn runs.
   * @returns {Promise<Float32Array>} the agent's motion [frames_per_turn * 56]
   */
  async step(userAudio, userMotion, agentAudio) {
    const ua = this._audio(userAudio, 'user_audio', true);
    const um = userMotion === null || userMotion === undefined ? null : this._motion(userMotion, 'user_motion', true);
    const aa = this._audio(agentAudio, 'agent_audio', true);
    return this._serial(async () => {
      const [motion, after, write] = await this._turn(this._conv, ua, um, aa);
      write();
      this._conv = { ...this._conv, ...after };
      return motion;
    });
  }

  /**
   * Pieces of any length; returns the frames of every turn this call completed,
   * Float32Array [k * frames_per_turn * 56] (k may be 0). A turn completes when both audio streams
   * hold a whole turn and, once user motion has been fed since the reset, the user motion too.
   */
  async feed(userAudio = null, userMotion = null, agentAudio = null) {
    const cat = (a, b) => { const o = new Float32Array(a.length + b.length); o.set(a); o.set(b, a.length); return o; };
    const pieces = {
      ua: userAudio === null ? null : this._audio(userAudio, 'user_audio'),
      aa: agentAudio === null ? null : this._audio(agentAudio, 'agent_audio'),
      um: userMotion === null ? null : this._motion(userMotion, 'user_motion'),
    };
    return this._serial(async () => {
      let conv = { ...this._conv };
      const dim = this.model.dim, f = this.model.frames, s = this.model.samples;
      if (pieces.ua) conv.ua = cat(conv.ua, pieces.ua);
      if (pieces.aa) conv.aa = cat(conv.aa, pieces.aa);
      if (pieces.um) { conv.um = cat(conv.um, pieces.um); conv.tracked = true; conv.last = pieces.um.slice(-dim); }
      let ready = Math.floor(Math.min(conv.ua.length, conv.aa.length) / s);
      if (conv.tracked) ready = Math.min(ready, Math.floor(conv.um.length / (f * dim)));
      const saved = ready >= 2 ? this._cache.map((a) => a.slice()) : null;   // roll back on failure
      const out = new Float32Array(ready * f * dim);
      try {
        for (let k = 0; k < ready; k++) {
          const [motion, after, write] = await this._turn(conv, conv.ua.subarray(0, s),
            conv.tracked ? conv.um.subarray(0, f * dim) : null, conv.aa.subarray(0, s));
          write();
          out.set(motion, k * f * dim);
          conv = { ...conv, ...after, ua: conv.ua.subarray(s), aa: conv.aa.subarray(s),
            um: conv.tracked ? conv.um.subarray(f * dim) : conv.um };
        }
      } catch (e) {
        if (saved) saved.forEach((a, i) => this._cache[i].set(a));
        throw e;
      }
      this._conv = conv;
      return out;
    });
  }

  _serial(fn) {
    const run = this._queue.then(fn);
    this._queue = run.catch(() => {});
    return run;
  }

  _audio(audio, name, exact = false) {
    const a = toFloat32(audio, name);
    if (exact && a.length !== this.model.samples) {
      throw new TimarInputError(`${name}: expected ${this.model.samples} samples (one turn at `
        + `${this.model.bundle.manifest.sample_rate} Hz), got ${a.length}; use feed() for other lengths`);
    }
    return a;
  }

  _motion(motion, name, exact = false) {
    const dtype = dtypeOf(motion), dim = this.model.dim;
    if ((dtype !== 'float32' && dtype !== 'float64') || motion.length % dim !== 0) {
      throw new TimarInputError(`${name}: expected a float array of shape (frames, ${dim}), got `
        + `${dtype ?? motion?.constructor?.name ?? typeof motion} of length ${motion?.length}`);
    }
    const frames = motion.length / dim;
    if (exact && frames !== this.model.frames) {
      throw new TimarInputError(`${name}: expected ${this.model.frames} frames (one turn), got ${frames}`);
    }
    if (frames === 0) throw new TimarInputError(`${name}: empty array`);
    const m = Float32Array.from(motion);
    let peak = 0;
    for (const v of m) {
      if (!Number.isFinite(v)) throw new TimarInputError(`${name}: contains NaN or Inf (or values beyond float32)`);
      peak = Math.max(peak, Math.abs(v));
    }
    if (peak > MOTION_LIMIT) {
      throw new TimarInputError(`${name}: expected FLAME values within +-${formatG(MOTION_LIMIT)} (expression `
        + `coefficients and radians), got a value of magnitude ${formatG(peak, 4)}`);
    }
    return m;
  }

  /** One turn without changing the session: [motion, the conversation fields after it, write()]. */
  async _turn(conv, ua, um, aa) {
    const model = this.model, f = model.frames, dim = model.dim, s = model.samples, rows = this.rows;
    const T = (type, data, dims) => new ort.Tensor(type, data, dims);
    const rep = (a) => { const o = new Float32Array(rows * a.length); for (let r = 0; r < rows; r++) o.set(a, r * a.length); return o; };
    // A user whose face is not tracked reads as the neutral face, and gets the "absent" flag.
    const userMotion = new Float32Array(f * dim);
    for (let i = 0; i < f * dim; i++) {
      const d = i % dim;
      userMotion[i] = Math.fround(Math.fround((um === null ? 0 : um[i]) - model.motionMean[d]) / model.motionStd[d]);
    }
    const waves = new Float32Array(2 * s);
    waves.set(ua, 0);
    waves.set(aa, s);
    const feats = (await model.sessions.audio_encoder.run({ waveform: T('float32', waves, [2, s]) })).speech_features;
    const da = feats.dims[2], half = f * da;
    const inputs = {
      user_speech: T('float32', rep(feats.data.subarray(0, half)), [rows, f, da]),
      user_motion: T('float32', rep(userMotion), [rows, f, dim]),
      agent_speech: T('float32', rep(feats.data.subarray(half, 2 * half)), [rows, f, da]),
      agent_motion: T('float32', new Float32Array(rows * f * dim), [rows, f, dim]),
      agent_mask: T('float32', new Float32Array(rows * f).fill(1), [rows, f]),
      uncond: T('float32', Float32Array.from([0, 1].slice(0, rows)), [rows]),
      user_motion_absent: T('float32', new Float32Array(rows).fill(um === null ? 1 : 0), [rows]),
      past_turn_age: T('int64', this._tokenAges(conv.ring), [rows, conv.ring.slots * conv.ring.tokensPerTurn]),
    };
    this._cacheNames.forEach((name, i) => { inputs[name] = this._cacheTensors[i]; });
    const step = model.sessions.encoder_step;
    let out = await step.run(inputs);
    const z = out.z.data;
    const noise = new PhiloxNormal(this.seed);
    noise.setState({ seed: this.seed, counter: conv.counter });
    const draws = noise.normal((this.steps + 1) * f * dim);
    const dz = out.z.dims[2];
    const zTensor = T('float32', z, [rows * f, dz]);
    const denoiser = model.sessions.denoiser;
    const denoise = async (x, t, _z, n) => (await denoiser.run({
      x_t: T('float32', x, [n, dim]), t: T('float32', t, [n]), z: zTensor })).model_output.data;
    const x = await sampleTurn(denoise, z, draws, this.schedule, this.temperature, this.cfg, f, dim);
    if (this.history === 'feedback') {
      Object.assign(inputs, { agent_motion: T('float32', rep(x), [rows, f, dim]),
        agent_mask: T('float32', new Float32Array(rows * f), [rows, f]), uncond: T('float32', new Float32Array(rows), [rows]) });
      out = await step.run(inputs);
    }
    const present = out.present_key_values;
    let motion = new Float32Array(f * dim);
    for (let i = 0; i < motion.length; i++) {
      motion[i] = Math.fround(Math.fround(x[i] * model.motionStd[i % dim]) + model.motionMean[i % dim]);
    }
    if (![motion, z, present.data].every((a) => a.every(Number.isFinite))) {
      throw new TimarRuntimeError(`turn ${conv.turns}: the model produced NaN or Inf from finite, in-range input; `
        + 'the session is unchanged (is the bundle\'s model sound?)');
    }
    let smoothed;
    [motion, smoothed] = smooth(motion, conv.smoothed, this._a, dim);
    const slot = conv.ring.nextSlot();
    const after = { ring: conv.ring.advance(), counter: noise.getState().counter, turns: conv.turns + 1, smoothed };
    return [motion, after, () => this._commit(present, slot)];
  }

  /** past_turn_age, the slots outside the visible context (contextTurns) reading W. */
  _tokenAges(ring) {
    const ages = ring.tokenAges(this.rows);
    if (this.contextTurns !== null) {
      const w = BigInt(ring.contextTurns), visible = BigInt(this.contextTurns);
      for (let i = 0; i < ages.length; i++) if (ages[i] > visible) ages[i] = w;
    }
    return ages;
  }

  /** Write the conditional row's present keys/values [L, 2, rows, H, P, hd] into `slot` of every row. */
  _commit(present, slot) {
    if (slot < 0) return;
    const [rows, heads, tokens, hd] = this._cacheDims, p = this._tokensPerSlot;
    const data = present.data, block = p * hd;
    const presentRows = present.dims[2];
    this._cache.forEach((cache, i) => {
      const src0 = i * presentRows * heads * block;        // (layer, key/value) = (i // 2, i % 2), row 0
      for (let r = 0; r < rows; r++) {
        for (let h = 0; h < heads; h++) {
          cache.set(data.subarray(src0 + h * block, src0 + (h + 1) * block), ((r * heads + h) * tokens + slot * p) * hd);
        }
      }
    });
  }
}
