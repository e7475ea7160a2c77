// Inference off the main thread: the model and the conversation live in this Web Worker.
import { Model, Session, ort } from './timar/index.js';

let session = null;

self.onmessage = async ({ data }) => {
  try {
    if (data.type === 'load') {
      const webgpu = data.ep === 'webgpu' || (data.ep === 'auto' && 'gpu' in navigator && (await navigator.gpu.requestAdapter()) !== null);
      const executionProviders = webgpu ? ['webgpu', 'wasm'] : ['wasm'];
      const model = await Model.load(data.bundle, { executionProviders, numThreads: data.threads });
      // One turn of silence on a throwaway session: the first live turn then runs at full speed
      // (wasm code and ONNX Runtime's buffers warmed up); the conversation's session starts fresh.
      const silence = new Float32Array(model.samples);
      await new Session(model).step(silence, null, silence);
      session = new Session(model, { seed: data.seed });
      self.postMessage({ type: 'loaded', info: model.info, loadMs: model.loadMs, providers: executionProviders,
        threads: ort.env.wasm.numThreads, isolated: self.crossOriginIsolated });
    } else if (data.type === 'step') {
      const t0 = performance.now();
      const motion = await session.step(data.userAudio, null, data.agentAudio);
      self.postMessage({ type: 'motion', turn: data.turn, motion, ms: performance.now() - t0 }, [motion.buffer]);
    }
  } catch (e) {
    self.postMessage({ type: 'error', message: `${e.name}: ${e.message}` });
  }
};
