/** timar-web: timar-sdk's runtime on ONNX Runtime Web, for the browser and Node. */
export { Model, ort } from './model.js';
export { Session, toFloat32, AUDIO_LIMIT, MOTION_LIMIT } from './session.js';
export { Bundle, sha256Hex } from './bundle.js';
export { PhiloxNormal, philoxBlock } from './philox.js';
export { TurnRing } from './ring.js';
export { respacedSchedule, respacedTimesteps, sampleTurn } from './sampler.js';
export { checkSmoothing, filterCoefficients, smooth } from './smoothing.js';
export { TimarInputError, TimarRuntimeError, BundleError } from './errors.js';
