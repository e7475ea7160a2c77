// The microphone at the AudioContext's rate (16 kHz), in blocks of 800 samples (50 ms) to the page.
class Capture extends AudioWorkletProcessor {
  constructor() { super(); this.buf = new Float32Array(800); this.n = 0; this.first = -1; }
  process(inputs) {
    const ch = inputs[0] && inputs[0][0];
    if (!ch) return true;
    if (this.first < 0) { this.first = currentTime; this.port.postMessage({ start: currentTime }); }
    for (let i = 0; i < ch.length; i++) {
      this.buf[this.n++] = ch[i];
      if (this.n === this.buf.length) { this.port.postMessage({ samples: this.buf }, [this.buf.buffer]); this.buf = new Float32Array(800); this.n = 0; }
    }
    return true;
  }
}
registerProcessor('capture', Capture);
