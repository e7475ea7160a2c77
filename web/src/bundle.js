/** Reading a bundle folder (or URL) and checking it, as timar_sdk/runtime/bundle.py:
 * the manifest's sha256 against manifest.sha256, its schema version and required fields, the
 * consistency of its numbers, that every listed file stays inside the folder, every file's sha256.
 * What this runtime does not run (window_recompute bundles, another generator) is refused here. */
import { BundleError, formatG } from './errors.js';
import { checkSmoothing } from './smoothing.js';
import { PhiloxNormal } from './philox.js';

export const SCHEMA_VERSION = 2;
export const MANIFEST = 'manifest.json';
export const MANIFEST_DIGEST = 'manifest.sha256';
export const TEMPERATURE_RANGE = [0.0, 10.0];
export const CFG_RANGE = [0.0, 20.0];
const REQUIRED = ['schema_version', 'format', 'model', 'attention', 'fps', 'sample_rate', 'frames_per_turn',
  'samples_per_turn', 'motion_dim', 'motion_layout', 'turn_layout', 'context_turns', 'history', 'motion_mean',
  'motion_std', 'diffusion', 'sampling', 'generator', 'graphs', 'engines'];
const F32_MAX = 3.4028234663852886e38;

const isNode = typeof process !== 'undefined' && !!process.versions?.node && typeof window === 'undefined';

/** lowercase hex sha256 of bytes (WebCrypto: the browser's and Node's). */
export async function sha256Hex(bytes) {
  const digest = await globalThis.crypto.subtle.digest('SHA-256', bytes);
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, '0')).join('');
}

/**
 * A reader of the files of a bundle: a folder path (Node) or a URL (browser, or http(s):// in Node).
 * @returns {{where: (name: string) => string, read: (name: string) => Promise<Uint8Array|null>}}
 *   read gives null for a missing file
 */
export async function bundleReader(source) {
  if (typeof source !== 'string' && !(source instanceof URL)) {
    throw new BundleError(`bundle: expected a bundle folder or URL (a string), got ${typeof source}`);
  }
  const text = String(source);
  if (isNode && !/^(https?|data|blob):/.test(text)) {
    const fs = await import('node:fs/promises');
    const path = await import('node:path');
    const url = await import('node:url');
    const dir = text.startsWith('file:') ? url.fileURLToPath(text) : path.resolve(text);
    return {
      where: (name) => path.join(dir, name),
      read: async (name) => {
        try { return new Uint8Array(await fs.readFile(path.join(dir, name))); } catch (e) {
          if (e.code === 'ENOENT' || e.code === 'EISDIR') return null;
          throw e;
        }
      },
    };
  }
  const base = new URL(text.endsWith('/') ? text : `${text}/`, globalThis.location?.href);
  return {
    where: (name) => new URL(name, base).href,
    read: async (name) => {
      const response = await fetch(new URL(name, base));
      if (response.status === 404) return null;
      if (!response.ok) throw new BundleError(`${new URL(name, base).href}: HTTP ${response.status}`);
      return new Uint8Array(await response.arrayBuffer());
    },
  };
}

/** manifest's numbers the schema cannot check (bundle.py check_consistency). */
export function checkConsistency(m, where = MANIFEST) {
  const fail = (field, expected, got) => { throw new BundleError(`${where}: ${field}: expected ${expected}, got ${got}`); };
  for (const field of ['motion_mean', 'motion_std']) {
    const v = m[field];
    if (!Array.isArray(v) || v.length !== m.motion_dim) fail(field, `${m.motion_dim} values`, Array.isArray(v) ? v.length : typeof v);
    if (!v.every((x) => typeof x === 'number' && Number.isFinite(x) && Math.abs(x) <= F32_MAX)) {
      fail(field, '56 finite float32 values', 'NaN, Inf or an out-of-range value');
    }
  }
  if (!m.motion_std.every((x) => x > 0)) fail('motion_std', 'values > 0', `min ${Math.min(...m.motion_std)}`);
  const d = m.diffusion, ac = d.alphas_cumprod;
  if (ac.length !== d.num_train_steps) fail('diffusion.alphas_cumprod', `num_train_steps = ${d.num_train_steps} values`, ac.length);
  if (!ac.every((a, i) => Number.isFinite(a) && a > 0 && a < 1 && (i === 0 || a < ac[i - 1]))) {
    fail('diffusion.alphas_cumprod', 'finite values in (0, 1), strictly decreasing', 'values that are not');
  }
  if (m.samples_per_turn * m.fps !== m.frames_per_turn * m.sample_rate) {
    fail('samples_per_turn', `frames_per_turn * sample_rate / fps = ${formatG(m.frames_per_turn * m.sample_rate / m.fps)}`,
      m.samples_per_turn);
  }
  const w = m.context_turns;
  if (m.attention === 'cached') {
    const c = m.cache;
    for (const [field, want] of [['slots', w - 1], ['empty_age', w]]) {
      if (c[field] !== want) fail(`cache.${field}`, `${want} (context_turns ${w})`, c[field]);
    }
    const tokens = c.past_key_values_shape[4];
    if (tokens !== (w - 1) * c.tokens_per_slot) {
      fail('cache.past_key_values_shape[4]', `(context_turns - 1) * tokens_per_slot = ${(w - 1) * c.tokens_per_slot}`, tokens);
    }
    if (c.past_key_values_inputs.length !== 2 * c.layers) {
      fail('cache.past_key_values_inputs', `2 * layers = ${2 * c.layers} names`, c.past_key_values_inputs.length);
    }
  }
  const s = m.sampling;
  if (!(s.steps >= 1 && s.steps <= d.num_train_steps)) fail('sampling.steps', `1..${d.num_train_steps}`, s.steps);
  for (const [field, [lo, hi]] of [['temperature', TEMPERATURE_RANGE], ['cfg', CFG_RANGE]]) {
    if (!(s[field] >= lo && s[field] <= hi)) fail(`sampling.${field}`, `a number in ${formatG(lo)}..${formatG(hi)}`, s[field]);
  }
  if ('smoothing' in m) {
    try { checkSmoothing(m.smoothing, 'smoothing'); } catch (e) { throw new BundleError(`${where}: ${e.message}`); }
  }
}

function checkRelative(name, field, where) {
  if (typeof name !== 'string' || !name || name.startsWith('/') || /^[A-Za-z]:/.test(name)
      || name.split('/').includes('..') || name.includes('\\') || name.includes('\0') || /^[a-z]+:/i.test(name)) {
    throw new BundleError(`${where}: ${field}: expected a relative path inside the bundle folder, got '${name}'`);
  }
}

/** A checked bundle: manifest, id (the manifest's sha256) and its graphs' bytes. */
export class Bundle {
  /**
   * @param {string|URL} source bundle folder (Node) or URL (browser; relative to the page)
   * @param {{verifyHashes?: boolean}} [options]
   * @returns {Promise<Bundle>}
   */
  static async load(source, { verifyHashes = true } = {}) {
    const reader = await bundleReader(source);
    const where = reader.where(MANIFEST);
    const data = await reader.read(MANIFEST);
    if (data === null) {
      throw new BundleError(`bundle: no manifest.json in '${String(source)}' (expected a folder written by timar-export)`);
    }
    const id = await sha256Hex(data);
    const digest = await reader.read(MANIFEST_DIGEST);
    if (digest === null) {
      throw new BundleError(`bundle: no ${MANIFEST_DIGEST} in '${String(source)}': re-export the bundle with `
        + 'this timar-sdk (bundles now carry the sha256 of their manifest)');
    }
    if (new TextDecoder().decode(digest).trim() !== id) {
      throw new BundleError(`${where}: does not match ${MANIFEST_DIGEST} (edited or corrupted); re-export the `
        + 'bundle, or restore the original manifest.json');
    }
    let text, manifest;
    try {
      text = new TextDecoder('utf-8', { fatal: true }).decode(data);
    } catch {
      throw new BundleError(`${where}: not a text file (expected UTF-8 JSON)`);
    }
    try {
      manifest = JSON.parse(text);
    } catch (e) {
      throw new BundleError(`${where}: not valid JSON (${e.message})`);
    }
    const version = manifest?.schema_version;
    if (!Number.isInteger(version)) throw new BundleError(`${where}: no integer schema_version; not a timar-sdk bundle manifest`);
    if (version !== SCHEMA_VERSION) {
      throw new BundleError(`${where}: schema_version ${version} is ${version > SCHEMA_VERSION ? 'newer' : 'older'} than `
        + `this timar-sdk reads (${SCHEMA_VERSION}); re-export the bundle with this timar-sdk or upgrade`);
    }
    for (const key of REQUIRED) {
      if (!(key in manifest)) throw new BundleError(`${where}: invalid at (top level): '${key}' is a required property`);
    }
    if (manifest.attention !== 'cached') {
      throw new BundleError(`${where}: attention '${manifest.attention}' is not supported by the JavaScript runtime `
        + "(it runs 'cached' bundles, the SDK's own models); run this bundle with the Python or C++ runtime");
    }
    const cacheDtype = manifest.cache?.dtype ?? 'float32';
    if (cacheDtype !== 'float32') {
      throw new BundleError(`${where}: cache.dtype '${cacheDtype}' is not supported by the JavaScript runtime (it `
        + "keeps a 'float32' cache); run this bundle with the Python or C++ runtime, or convert without a half-size cache");
    }
    if (manifest.generator?.name !== PhiloxNormal.NAME) {
      throw new BundleError(`${where}: generator '${manifest.generator?.name}' is not implemented here `
        + `(this runtime has '${PhiloxNormal.NAME}')`);
    }
    try {
      checkConsistency(manifest, where);
    } catch (e) {      // a field of the wrong type or shape, which the JSON schema would have named
      if (e instanceof BundleError) throw e;
      throw new BundleError(`${where}: invalid (${e.message}); expected a manifest written by timar-export`);
    }
    const graphs = {};
    for (const name of ['audio_encoder', 'encoder_step', 'denoiser']) {
      const graph = manifest.graphs[name];
      if (!graph) throw new BundleError(`${where}: invalid at graphs: '${name}' is a required property`);
      checkRelative(graph.file, `graphs.${name}.file`, where);
      const bytes = await reader.read(graph.file);
      if (bytes === null) throw new BundleError(`${reader.where(graph.file)}: missing (graph '${name}' listed in manifest.json)`);
      if (verifyHashes && (await sha256Hex(bytes)) !== graph.sha256) {
        throw new BundleError(`${reader.where(graph.file)}: sha256 does not match manifest.json (graph '${name}'); the file `
          + 'is truncated, modified or from another export');
      }
      graphs[name] = bytes;
    }
    const bundle = new Bundle();
    Object.assign(bundle, { source: String(source), id, manifest, graphs, where });
    return bundle;
  }
}
