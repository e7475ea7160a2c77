/** `Model`: a checked bundle and its three ONNX Runtime Web sessions, loaded once and shared
 * by any number of `Session`s (each holds its own conversation). */
import * as ort from 'onnxruntime-web';
import { Bundle } from './bundle.js';
import { BundleError, TimarInputError, pyRepr } from './errors.js';

export { ort };

const PROVIDERS = ['wasm', 'webgpu', 'webnn', 'cpu'];

export class Model {
  /**
   * Load and check a bundle, then create its inference sessions.
   * @param {string|URL} source bundle folder (Node) or URL (browser, relative to the page)
   * @param {object} [options]
   * @param {string[]} [options.executionProviders] ORT Web providers in order of preference,
   *   default ['wasm']; e.g. ['webgpu', 'wasm'] where the browser has WebGPU
   * @param {number} [options.numThreads] WASM threads (needs cross-origin isolation in a browser;
   *   set before the first model of the page or process loads, as ORT reads it once)
   * @param {string} [options.graphOptimizationLevel] 'disabled' | 'basic' | 'extended' | 'all' (default)
   * @param {boolean} [options.verifyHashes] check every graph's sha256 (default true)
   * @param {object} [options.sessionOptions] more ONNX Runtime Web session options, for every graph
   * @returns {Promise<Model>}
   */
  static async load(source, options = {}) {
    const { executionProviders = ['wasm'], numThreads, graphOptimizationLevel = 'all', verifyHashes = true,
      sessionOptions = {} } = options;
    if (!Array.isArray(executionProviders) || !executionProviders.length
        || !executionProviders.every((p) => PROVIDERS.includes(p))) {
      throw new TimarInputError(`executionProviders: expected a non-empty list of ${pyRepr(PROVIDERS)}, `
        + `got ${pyRepr(executionProviders)}`);
    }
    if (numThreads !== undefined) {
      if (!Number.isInteger(numThreads) || numThreads < 1 || numThreads > 64) {
        throw new TimarInputError(`numThreads: expected an integer in 1..64, got ${pyRepr(numThreads)}`);
      }
      ort.env.wasm.numThreads = numThreads;
    }
    const t0 = performance.now();
    const bundle = await Bundle.load(source, { verifyHashes });
    // ONNX Runtime Web leaves the CPU arena and memory patterns off unless asked (native ORT has them
    // on): on, a turn is about 20% faster here (BENCHMARKS.md, browser).
    const opts = { executionProviders, graphOptimizationLevel, executionMode: 'sequential', enableCpuMemArena: true,
      enableMemPattern: true, ...sessionOptions };
    const sessions = {};
    for (const [name, bytes] of Object.entries(bundle.graphs)) {
      try {
        sessions[name] = await ort.InferenceSession.create(bytes, opts);
      } catch (e) {
        throw new BundleError(`${bundle.where.replace(/manifest\.json$/, bundle.manifest.graphs[name].file)}: ONNX Runtime `
          + `Web cannot load this graph (${e.message})`);
      }
    }
    delete bundle.graphs;   // the sessions hold the graphs now
    const model = new Model();
    const m = bundle.manifest;
    Object.assign(model, {
      bundle, sessions, executionProviders,
      frames: m.frames_per_turn, samples: m.samples_per_turn, dim: m.motion_dim,
      motionMean: Float32Array.from(m.motion_mean), motionStd: Float32Array.from(m.motion_std),
      loadMs: performance.now() - t0,
    });
    return model;
  }

  /** The bundle's facts and the backend. */
  get info() {
    const m = this.bundle.manifest;
    return {
      fps: m.fps, frames_per_turn: this.frames, sample_rate: m.sample_rate, samples_per_turn: this.samples,
      motion_dim: this.dim, motion_layout: { exp: m.motion_layout.exp, jaw: m.motion_layout.jaw, neck: m.motion_layout.neck },
      context_turns: m.context_turns, attention: m.attention, backend: 'onnxruntime-web',
      providers: [...this.executionProviders], model_preset: m.model.preset, bundle: this.bundle.id,
    };
  }

  /** Release the inference sessions. */
  async release() {
    for (const s of Object.values(this.sessions)) await s.release();
  }
}
