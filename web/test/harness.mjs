#!/usr/bin/env node
/** Command-line harness the Python tests (tests/test_web.py) drive, so the JS runtime runs on
 * exactly the inputs Python's runs on. Float arrays travel as raw little-endian float32 files.
 *
 *   node harness.mjs turns SPEC.json OUT.f32     spec: {bundle, options, turns, user_audio, agent_audio,
 *                                                 user_motion (file or null), threads}
 *   node harness.mjs philox SEED COUNTER N OUT   uint32 [N] then float32 normals [N] from (seed, counter)
 *   node harness.mjs errors BUNDLE CASES.json    prints a JSON list: each case's error "Name: message" or null
 *   node harness.mjs bundle DIR                  loads DIR; prints "ok ID" or "Name: message"
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { Model, Session, PhiloxNormal, Bundle } from '../src/index.js';

const readF32 = (path) => { const b = readFileSync(path); return new Float32Array(b.buffer, b.byteOffset, b.byteLength / 4); };
const [mode, ...args] = process.argv.slice(2);

const TYPES = { float32: Float32Array, float64: Float64Array, int16: Int16Array, int32: Int32Array };
/** An array from a case descriptor {dtype, n, value, set: [[index, value]]}; special values as strings. */
function make(desc) {
  if (desc === null) return null;
  if (desc.js !== undefined) return desc.js === 'list' ? [0.1, 0.2] : desc.js;
  const num = (v) => (v === 'nan' ? NaN : v === 'inf' ? Infinity : v === '-inf' ? -Infinity : v);
  const a = new TYPES[desc.dtype](desc.n).fill(num(desc.value ?? 0));
  for (const [i, v] of desc.set ?? []) a[i] = num(v);
  return a;
}

if (mode === 'turns') {
  const spec = JSON.parse(readFileSync(args[0], 'utf8'));
  const at = (p) => resolve(dirname(args[0]), p);
  const model = await Model.load(spec.bundle, { numThreads: spec.threads ?? 1 });
  const session = new Session(model, spec.options);
  const ua = readF32(at(spec.user_audio)), aa = readF32(at(spec.agent_audio));
  const um = spec.user_motion ? readF32(at(spec.user_motion)) : null;
  const s = model.samples, fd = model.frames * model.dim;
  const out = new Float32Array(spec.turns * fd);
  const ms = [];
  if (spec.feed) {                          // audio in pieces of spec.feed samples through feed()
    let at = 0;
    for (let i = 0; i < spec.turns * s; i += spec.feed) {
      const j = Math.min(i + spec.feed, spec.turns * s);
      const frames = await session.feed(ua.subarray(i, j), null, aa.subarray(i, j));
      out.set(frames, at);
      at += frames.length;
    }
    if (at !== out.length) throw new Error(`feed returned ${at / fd} turns, expected ${spec.turns}`);
  }
  for (let k = 0; k < (spec.feed ? 0 : spec.turns); k++) {
    const t0 = performance.now();
    const motion = await session.step(ua.subarray(k * s, (k + 1) * s), um && um.subarray(k * fd, (k + 1) * fd),
      aa.subarray(k * s, (k + 1) * s));
    ms.push(performance.now() - t0);
    out.set(motion, k * fd);
  }
  writeFileSync(args[1], Buffer.from(out.buffer));
  console.log(JSON.stringify({ ms }));
} else if (mode === 'philox') {
  const [seed, counter, n, outPath] = args;
  const g = new PhiloxNormal(BigInt(seed));
  g.setState({ seed: BigInt(seed), counter: BigInt(counter) });
  const u = g.uniformU32(Number(n));
  g.setState({ seed: BigInt(seed), counter: BigInt(counter) });
  const z = g.normal(Number(n));
  const buf = Buffer.alloc(8 * Number(n));
  Buffer.from(u.buffer, u.byteOffset, u.byteLength).copy(buf, 0);
  Buffer.from(z.buffer, z.byteOffset, z.byteLength).copy(buf, 4 * Number(n));
  writeFileSync(outPath, buf);
  console.log(JSON.stringify({ counter: g.getState().counter.toString() }));
} else if (mode === 'errors') {
  const model = await Model.load(args[0], { numThreads: 1 });
  const cases = JSON.parse(readFileSync(args[1], 'utf8'));
  const results = [];
  for (const c of cases) {
    try {
      const session = new Session(model, c.options ?? {});
      if (c.step) {
        const before = session.turns;
        await session.step(make(c.step.user_audio), make(c.step.user_motion), make(c.step.agent_audio));
        if (session.turns === before) throw new Error('step returned without running a turn');
      }
      results.push(null);
    } catch (e) {
      results.push(`${e.name}: ${e.message}`);
    }
  }
  console.log(JSON.stringify(results));
} else if (mode === 'bundle') {
  try {
    const b = await Bundle.load(args[0]);
    console.log(`ok ${b.id}`);
  } catch (e) {
    console.log(`${e.name}: ${e.message}`);
  }
} else {
  console.error('usage: harness.mjs turns|philox|errors|bundle ...');
  process.exit(2);
}
