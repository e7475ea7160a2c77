#!/usr/bin/env node
/**
 * Write the demo page into a folder any static file server can serve:
 *
 *   npm run demo -- --out DIR [--bundle BUNDLE_DIR] [--agent AUDIO_FILE]
 *   python -m http.server -d DIR 8000        # then open http://localhost:8000/
 *
 * DIR gets the page, the runtime (timar/), ONNX Runtime Web's module and wasm (vendor/ort/),
 * three (vendor/three/), the service worker that gives cross-origin isolation on a plain server,
 * the bundle (bundle/) and the agent's audio (audio/). Nothing is fetched from outside DIR.
 * Defaults, inside a timar-sdk checkout: the shipped tiny bundle and the demo conversation's agent track.
 */
import { cpSync, existsSync, mkdirSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { basename, dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

const WEB = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const REPO = resolve(WEB, '..');
const { values } = parseArgs({ options: {
  out: { type: 'string' }, bundle: { type: 'string' }, agent: { type: 'string' }, help: { type: 'boolean' } } });
const usage = 'usage: npm run demo -- --out DIR [--bundle BUNDLE_DIR] [--agent AUDIO_FILE]';
if (values.help) { console.log(usage); process.exit(0); }
const die = (message) => { console.error(`build-demo: ${message}\n${usage}`); process.exit(2); };
if (!values.out) die('--out: expected the folder to write the page into');
const out = resolve(values.out);
const bundle = resolve(values.bundle ?? join(REPO, 'timar_sdk', 'assets', 'default_bundle'));
const agent = resolve(values.agent ?? join(REPO, 'timar_sdk', 'assets', 'demo_conversation', 'agent.flac'));
if (!existsSync(join(bundle, 'manifest.json'))) die(`--bundle: no manifest.json in ${bundle} (expected a folder written by timar-export)`);
if (!existsSync(agent)) die(`--agent: no file ${agent} (expected an audio file the browser decodes: wav, flac, mp3, ogg)`);

/** The folder of an installed dependency: node_modules/NAME here or in a folder above (npm's lookup). */
function pkg(name) {
  for (let dir = WEB; ; dir = dirname(dir)) {
    if (existsSync(join(dir, 'node_modules', name, 'package.json'))) return join(dir, 'node_modules', name);
    if (dirname(dir) === dir) die(`dependency ${name} not installed: run npm ci in ${WEB}`);
  }
}
const ortDist = join(pkg('onnxruntime-web'), 'dist');
mkdirSync(join(out, 'timar'), { recursive: true });
mkdirSync(join(out, 'vendor', 'ort'), { recursive: true });
mkdirSync(join(out, 'vendor', 'three'), { recursive: true });
mkdirSync(join(out, 'audio'), { recursive: true });

cpSync(join(WEB, 'page'), out, { recursive: true });
// The runtime; a module worker has no import map, so its one bare import becomes a path.
for (const name of readdirSync(join(WEB, 'src'))) {
  const text = readFileSync(join(WEB, 'src', name), 'utf8').replace(/from 'onnxruntime-web'/g, "from '../vendor/ort/ort.min.mjs'");
  writeFileSync(join(out, 'timar', name), text);
}
// ort.min.mjs runs the WASM and WebGPU providers from one wasm build (JSEP)
for (const name of ['ort.min.mjs', 'ort-wasm-simd-threaded.jsep.mjs', 'ort-wasm-simd-threaded.jsep.wasm']) {
  cpSync(join(ortDist, name), join(out, 'vendor', 'ort', name));
}
for (const name of ['three.module.js', 'three.core.js']) cpSync(join(pkg('three'), 'build', name), join(out, 'vendor', 'three', name));
cpSync(join(pkg('coi-serviceworker'), 'coi-serviceworker.min.js'), join(out, 'coi-serviceworker.js'));
for (const name of ['LICENSE']) {
  for (const dep of ['onnxruntime-web', 'three', 'coi-serviceworker']) {
    if (existsSync(join(pkg(dep), name))) cpSync(join(pkg(dep), name), join(out, 'vendor', `${dep}.${name}`));
  }
}
cpSync(bundle, join(out, 'bundle'), { recursive: true });
const agentName = `agent${basename(agent).slice(basename(agent).lastIndexOf('.'))}`;
cpSync(agent, join(out, 'audio', agentName));
writeFileSync(join(out, 'config.json'), `${JSON.stringify({ bundle: 'bundle/', agent: `audio/${agentName}` }, null, 1)}\n`);
console.log(`wrote the demo page to ${out}\nserve it: python -m http.server -d ${out} 8000   (then open http://localhost:8000/)`);
