#!/usr/bin/env node
/**
 * Drive the demo page in headless Chromium (Debian's, through puppeteer-core: no browser is
 * downloaded) with a WAV file as the fake microphone; write what the page ran.
 *
 *   node browser.mjs (--url http://127.0.0.1:PORT/ | --site DEMO_DIR) --wav USER.wav --out DIR [--turns N]
 *                    [--screenshot FILE.png] [--at TURN] [--threads N] [--seed S] [--timeout SECONDS] [--render 0]
 *
 * --site serves DEMO_DIR (written by `npm run demo`) itself on 127.0.0.1 for the run.
 * It prints the per-turn time the page measured in its worker (p50, p95) and writes:
 *
 * DIR: user.f32 / agent.f32 (the 16 kHz audio each turn got, concatenated), motion.f32
 * ([turns * 25, 56]) and result.json ({ms per turn, info, error, console}). The screenshot is
 * taken once the page has returned `at` turns (default: half of them), mid-conversation.
 */
import { createReadStream, mkdirSync, statSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { extname, join, normalize, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import puppeteer from 'puppeteer-core';

const { values: o } = parseArgs({ options: {
  url: { type: 'string' }, site: { type: 'string' }, wav: { type: 'string' }, out: { type: 'string' }, turns: { type: 'string', default: '4' },
  screenshot: { type: 'string' }, render: { type: 'string', default: '1' }, at: { type: 'string' }, threads: { type: 'string' }, seed: { type: 'string', default: '0' },
  timeout: { type: 'string', default: '100' }, chromium: { type: 'string', default: process.env.CHROMIUM || '/usr/bin/chromium' } } });
const turns = Number(o.turns), at = Number(o.at ?? Math.max(1, Math.floor(turns / 2)));
const deadline = Date.now() + 1000 * Number(o.timeout);
mkdirSync(o.out, { recursive: true });

const TYPES = { '.html': 'text/html', '.js': 'text/javascript', '.mjs': 'text/javascript', '.css': 'text/css',
  '.json': 'application/json', '.wasm': 'application/wasm', '.onnx': 'application/octet-stream' };
/** A plain static server for DEMO_DIR on 127.0.0.1 (no COOP/COEP headers: the page's service worker adds them). */
async function serve(dir) {
  const root = resolve(dir);
  const server = createServer((req, res) => {
    const path = normalize(join(root, decodeURIComponent(new URL(req.url, 'http://x').pathname)));
    let file = path.endsWith('/') ? join(path, 'index.html') : path;
    try { if (statSync(file).isDirectory()) file = join(file, 'index.html'); statSync(file); } catch { file = null; }
    if (!file || !file.startsWith(root)) { res.writeHead(404).end(); return; }
    res.writeHead(200, { 'Content-Type': TYPES[extname(file)] ?? 'application/octet-stream' });
    createReadStream(file).pipe(res);
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  return server;
}
const server = o.site ? await serve(o.site) : null;
if (server) o.url = `http://127.0.0.1:${server.address().port}/`;

const browser = await puppeteer.launch({
  executablePath: o.chromium, headless: true,
  args: ['--no-sandbox', '--use-fake-ui-for-media-stream', '--use-fake-device-for-media-stream',
    `--use-file-for-fake-audio-capture=${o.wav}`, '--autoplay-policy=no-user-gesture-required',
    '--enable-unsafe-swiftshader', '--use-angle=swiftshader', '--window-size=1000,700', '--mute-audio'],
  defaultViewport: { width: 1000, height: 700 },
});
const log = [];
let result = { error: null };
try {
  const page = await browser.newPage();
  page.on('console', (m) => log.push(`${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => log.push(`pageerror: ${e.message}`));
  const query = new URLSearchParams({ autostart: '1', turns: String(turns), seed: o.seed });
  if (o.threads) query.set('threads', o.threads);
  if (o.render === '0') query.set('render', '0');
  await page.goto(`${o.url}?${query}`, { waitUntil: 'load' });
  // coi-serviceworker reloads the page once to become cross-origin isolated: poll across reloads.
  const poll = async (fn, what) => {
    for (;;) {
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
      const v = await page.evaluate(fn).catch(() => null);
      if (v && v.error) throw new Error(`page: ${v.error}`);
      if (v && v.ok) return v;
      await new Promise((r) => setTimeout(r, 100));
    }
  };
  await poll(() => window.timar && { ok: window.timar.turns.filter((t) => t && t.motion).length >= 0 && window.timar.loaded, error: window.timar.error }, 'the model');
  await poll((n) => window.timar && { ok: window.timar.turns.filter((t) => t && t.motion).length >= 1, error: window.timar.error }, 'the first turn');
  if (o.screenshot) {
    await poll(new Function(`return window.timar && { ok: window.timar.turns.filter((t) => t && t.motion).length >= ${at}, error: window.timar.error };`), `turn ${at}`);
    await new Promise((r) => setTimeout(r, 1500));   // let playback reach the motion
    await page.screenshot({ path: o.screenshot });
  }
  await poll(() => window.timar && { ok: window.timar.done, error: window.timar.error }, 'the last turn');
  const got = await page.evaluate(() => {
    const b64 = (a) => { let s = ''; const u = new Uint8Array(a.buffer, a.byteOffset, a.byteLength); for (let i = 0; i < u.length; i += 0x8000) s += String.fromCharCode(...u.subarray(i, i + 0x8000)); return btoa(s); };
    const t = window.timar;
    return { ms: t.ms, info: t.info, turns: t.turns.map((x) => ({ user: b64(x.userAudio), agent: b64(x.agentAudio), motion: b64(x.motion) })) };
  });
  const cat = (key) => Buffer.concat(got.turns.map((x) => Buffer.from(x[key], 'base64')));
  writeFileSync(join(o.out, 'user.f32'), cat('user'));
  writeFileSync(join(o.out, 'agent.f32'), cat('agent'));
  writeFileSync(join(o.out, 'motion.f32'), cat('motion'));
  result = { error: null, ms: got.ms, info: got.info };
} catch (e) {
  result = { error: e.message };
} finally {
  await browser.close();
  server?.close();
}
result.console = log;
writeFileSync(join(o.out, 'result.json'), JSON.stringify(result, (k, v) => (typeof v === 'bigint' ? v.toString() : v), 1));
const pct = (a, p) => [...a].sort((x, y) => x - y)[Math.min(a.length - 1, Math.floor(p * a.length))];
const warm = result.ms && result.ms.length > 6 ? result.ms.slice(3) : result.ms;    // after 3 warm-up turns
console.log(result.error ? `error: ${result.error}` : `ok: ${result.ms.length} turns; per turn after ${result.ms.length - warm.length} `
  + `warm-up: n ${warm.length}, p50 ${pct(warm, 0.5).toFixed(1)} ms, p95 ${pct(warm, 0.95).toFixed(1)} ms; threads `
  + `${result.info.threads}, isolated ${result.info.isolated}`);
process.exit(result.error ? 1 : 0);
