// The demo page: microphone = user, an audio file = agent, the head driven by the motion the
// worker returns, in sync with the agent's playback. URL parameters: seed (0), threads (2 when
// cross-origin isolated, else 1), ep (auto | wasm | webgpu), turns (stop after N turns; default:
// the agent file's length), lead (seconds of margin, 0.6), autostart (1: start without the button, for tests), render (0: do not
// draw the head, to time inference alone where WebGL runs in software).
import { Head } from './head.js';

const params = new URLSearchParams(location.search);
const num = (k, d) => (params.has(k) ? Number(params.get(k)) : d);
const SEED = num('seed', 0);
const THREADS = num('threads', self.crossOriginIsolated ? Math.min(2, navigator.hardwareConcurrency || 1) : 1);
const EP = params.get('ep') || 'auto';
// seconds of margin, beyond one turn, between the microphone and the agent's playback: a turn's
// motion must be ready within it (turn time + the 50 ms capture block + messaging)
const LEAD = num('lead', 0.6);
const $ = (id) => document.getElementById(id);

/** What a test reads: per turn the audio the model got and the motion it returned. */
const state = window.timar = { turns: [], ms: [], done: false, error: null, loaded: false, info: null };

const head = new Head($('head'));
const config = await (await fetch('config.json')).json();
const worker = new Worker('worker.js', { type: 'module' });
const fail = (message) => { state.error = message; $('status').textContent = `error: ${message}`; console.error(message); };
worker.onerror = (e) => fail(e.message || 'the worker failed to start');

let ctx = null, agent = null, playStart = Infinity, turnsWanted = 0, sent = 0;
const motions = [];
let user = new Float32Array(0);

worker.onmessage = ({ data }) => {
  if (data.type === 'error') return fail(data.message);
  if (data.type === 'loaded') {
    state.loaded = true;
    state.info = { ...data.info, threads: data.threads, isolated: data.isolated, loadMs: data.loadMs };
    $('backend').textContent = `${data.providers.join(' > ')}, ${data.threads} thread${data.threads > 1 ? 's' : ''}`
      + `${data.isolated ? ', cross-origin isolated' : ''}`;
    $('status').textContent = `model loaded in ${data.loadMs.toFixed(0)} ms; press start`;
    $('start').disabled = false;
    if (params.get('autostart') === '1') start();
    return;
  }
  // a turn's motion
  const k = data.turn;
  motions[k] = data.motion;
  state.ms.push(data.ms);
  state.turns[k].motion = data.motion;
  const ahead = (playStart + k) - ctx.currentTime;
  $('turn').textContent = `${k + 1}${turnsWanted ? ` / ${turnsWanted}` : ''}`;
  $('latency').textContent = `${data.ms.toFixed(1)} ms per 1 s turn`;
  const sorted = [...state.ms].sort((a, b) => a - b);
  const q = (p) => sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))];
  $('percentiles').textContent = `${q(0.5).toFixed(1)} / ${q(0.95).toFixed(1)} ms`;
  $('ahead').textContent = `${(ahead * 1000).toFixed(0)} ms`;
  if (k + 1 === turnsWanted) { state.done = true; $('status').textContent = 'conversation finished'; }
};

worker.postMessage({ type: 'load', bundle: new URL(config.bundle, location.href).href, seed: SEED, threads: THREADS, ep: EP });
$('start').disabled = true;
$('start').onclick = start;

async function start() {
  $('start').disabled = true;
  $('status').textContent = 'starting the microphone...';
  try {
    ctx = new AudioContext({ sampleRate: 16000 });
    await ctx.resume();
    const bytes = await (await fetch(config.agent)).arrayBuffer();
    const buffer = await ctx.decodeAudioData(bytes);
    agent = mono(buffer);
    const whole = Math.floor(agent.length / 16000);
    turnsWanted = Math.min(num('turns', whole), whole);
    const stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1 } });
    await ctx.audioWorklet.addModule('capture-worklet.js');
    const capture = new AudioWorkletNode(ctx, 'capture');
    const silent = ctx.createGain();
    silent.gain.value = 0;
    ctx.createMediaStreamSource(stream).connect(capture).connect(silent).connect(ctx.destination);
    capture.port.onmessage = ({ data }) => {
      if (data.start !== undefined) {                 // the first microphone sample's time
        playStart = data.start + 1 + LEAD;
        const source = ctx.createBufferSource();
        source.buffer = buffer;
        source.connect(ctx.destination);
        source.start(playStart);
        $('status').textContent = 'listening; the agent talks';
        return;
      }
      onSamples(data.samples);
    };
    requestAnimationFrame(draw);
  } catch (e) {
    fail(`${e.name}: ${e.message}`);
  }
}

function mono(buffer) {
  if (buffer.numberOfChannels === 1) return buffer.getChannelData(0).slice();
  const out = new Float32Array(buffer.length);
  for (let c = 0; c < buffer.numberOfChannels; c++) buffer.getChannelData(c).forEach((v, i) => { out[i] += v / buffer.numberOfChannels; });
  return out;
}

function onSamples(samples) {
  let peak = 0;
  for (const s of samples) peak = Math.max(peak, Math.abs(s));
  $('level').value = peak;
  const joined = new Float32Array(user.length + samples.length);
  joined.set(user);
  joined.set(samples, user.length);
  user = joined;
  while (user.length >= 16000 && sent < turnsWanted) {     // a whole turn of the user: run it
    const userAudio = user.slice(0, 16000);
    const agentAudio = agent.slice(sent * 16000, (sent + 1) * 16000);
    state.turns[sent] = { userAudio, agentAudio, motion: null };
    worker.postMessage({ type: 'step', turn: sent, userAudio: userAudio.slice(), agentAudio: agentAudio.slice() });
    user = user.slice(16000);
    sent += 1;
  }
}

let shown = -1, drawn = -2;
function draw() {
  requestAnimationFrame(draw);
  const t = ctx.currentTime - playStart;
  const frame = t < 0 ? -1 : Math.floor(t * 25), k = Math.floor(frame / 25);
  if (frame === drawn || params.get('render') === '0') return;   // 25 fps motion: draw each frame once
  drawn = frame;
  if (t < 0) { head.render(); return; }
  if (motions[k]) {
    shown = frame;
    head.pose(motions[k].subarray((frame % 25) * 56, (frame % 25 + 1) * 56));
  }
  $('caption').textContent = k < turnsWanted ? `agent audio ${t.toFixed(1)} s, frame ${shown}` : 'agent audio ended';
  head.render();
}
