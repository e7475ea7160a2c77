#!/usr/bin/env node
/**
 * Per-turn time of the JS runtime in Node (onnxruntime-web, WASM), and of each graph:
 *
 *   node scripts/bench-node.js [--bundle DIR] [--turns 30] [--threads 2] [--opt all|extended|basic|disabled] [--spin 1|0] [--arena 0|1]
 *
 * The turns are one conversation of synthetic 1 s turns (no user motion). Prints JSON:
 * per-turn p50/p95 in ms and the median of each graph's calls.
 */
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { Model, Session } from '../src/index.js';

const WEB = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const { values: o } = parseArgs({ options: {
  bundle: { type: 'string', default: join(WEB, '..', 'timar_sdk', 'assets', 'default_bundle') },
  turns: { type: 'string', default: '30' }, threads: { type: 'string', default: '2' }, opt: { type: 'string', default: 'all' },
  spin: { type: 'string', default: '1' }, arena: { type: 'string', default: '1' } } });
const model = await Model.load(o.bundle, { numThreads: Number(o.threads), graphOptimizationLevel: o.opt,
  sessionOptions: { extra: { session: { intra_op: { allow_spinning: o.spin } } },
    ...(o.arena === '0' ? { enableCpuMemArena: false, enableMemPattern: false } : {}) } });
const graphs = {};
for (const [name, s] of Object.entries(model.sessions)) {
  const run = s.run.bind(s);
  s.run = async (...a) => { const t0 = performance.now(); const r = await run(...a); (graphs[name] ??= []).push(performance.now() - t0); return r; };
}
const session = new Session(model, { seed: 1 });
const wave = (f) => Float32Array.from({ length: model.samples }, (_, i) => 0.1 * Math.sin(i * f) * Math.sin(i / 1600));
const ms = [];
for (let k = 0; k < 3 + Number(o.turns); k++) {         // 3 warm-up turns
  const t0 = performance.now();
  await session.step(wave(0.05 + 0.01 * k), null, wave(0.11 + 0.01 * k));
  if (k >= 3) ms.push(performance.now() - t0);
}
const q = (a, p) => [...a].sort((x, y) => x - y)[Math.min(a.length - 1, Math.floor(p * a.length))];
console.log(JSON.stringify({ threads: Number(o.threads), opt: o.opt, spin: o.spin, arena: o.arena, turns: ms.length, p50: +q(ms, 0.5).toFixed(1),
  p95: +q(ms, 0.95).toFixed(1), graphs: Object.fromEntries(Object.entries(graphs).map(([k, v]) => [k, +q(v, 0.5).toFixed(1)])) }));
