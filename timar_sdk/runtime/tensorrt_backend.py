"""TensorRT backend: the bundle's engines for this GPU, run with the TensorRT 10 or 11 Python API
(the I/O tensor API it uses is the same in both; ``tensorrt_compat``), pycuda device buffers and
one CUDA stream (docs/DESIGN.md sections 3-4).

Same interface as the backends in ``backends.py`` (numpy in and out at the edges), but the KV
cache stays on the GPU between turns: ``encoder_step`` binds each layer's keys and values
(``past_key_values.<layer>.key``/``.value``) to their place in the one cache buffer and leaves
``present_key_values`` in a device buffer, and ``commit`` copies the conditional row's present
keys/values into the cache slot device-to-device.

Written against NVIDIA's TensorRT 10 Python API documentation (11: its migration guide) (named I/O tensors,
``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``) and pycuda's driver reference;
no TensorRT was available where this was written, so only the parts that need no GPU
(``slot_copy``, the refusals) have been run. ``tests/test_tensorrt_backend.py`` checks the rest
against ONNX Runtime wherever ``tensorrt``, ``pycuda`` and a CUDA GPU are present.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from timar_sdk.runtime.tensorrt_env import check_tensorrt_available, gpu_info
from timar_sdk.runtime.bundle import Bundle

GRAPHS = ("audio_encoder", "encoder_step", "denoiser")
DEVICE = 0          # CUDA device index; choose the GPU with CUDA_VISIBLE_DEVICES
FLOAT_BYTES = 4


@dataclass
class DeviceCache:
    """The KV cache on the GPU: float32 [L, 2, rows, H, (W-1)*P, hd], C-contiguous."""
    alloc: Any                      # pycuda DeviceAllocation (freed when this object goes)
    shape: tuple[int, ...]


@dataclass(frozen=True)
class DevicePresent:
    """encoder_step's present_key_values, float32 [L, 2, batch, H, P, hd] on the GPU. It lives in
    the backend's output buffer: valid until the next encoder_step (the Session commits first)."""
    ptr: int
    batch: int


def slot_copy(cache_shape, tokens_per_slot: int, batch: int, slot: int, row: int) -> dict[str, int]:
    """``pycuda.driver.Memcpy3D`` fields (besides the two device pointers) that copy row 0 (the
    conditional row) of present [L, 2, batch, H, P, hd] into slot ``slot`` of cache row ``row``,
    cache [L, 2, rows, H, C = (W-1)*P, hd].

    Both tensors are read as pitched 3D arrays of byte rows: one row per (row, head) holding the
    P*hd floats of one slot, one 2D slice per (layer, k/v). CUDA addresses element (x, y, z) at
    base + (z * height + y) * pitch + x, so
      present: pitch P*hd*4, height batch*H; the conditional row is y = 0..H-1 of each slice;
      cache:   pitch C*hd*4, height rows*H;  x = slot*P*hd*4, y = row*H .. row*H+H-1.
    One copy moves the L*2*H blocks of P*hd floats that make up one cache row's slot.
    """
    layers, two, rows, heads, tokens, head_dim = (int(d) for d in cache_shape)
    block = tokens_per_slot * head_dim * FLOAT_BYTES
    return {"width_in_bytes": block, "height": heads, "depth": layers * two,
            "src_x_in_bytes": 0, "src_y": 0, "src_z": 0, "src_pitch": block, "src_height": batch * heads,
            "dst_x_in_bytes": slot * block, "dst_y": row * heads, "dst_z": 0,
            "dst_pitch": tokens * head_dim * FLOAT_BYTES, "dst_height": rows * heads}


class _Engine:
    """One deserialized engine with its execution context, and device buffers of the profile's
    largest shapes for its I/O tensors (page-locked host twins for those copied to or from the
    host). Tensors in ``external`` get no buffer: their address is bound on every run."""

    def __init__(self, trt, cuda, runtime, path: Path, external=(), device_only=()):
        self.name, self.cuda = path.stem, cuda
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{path}: TensorRT {trt.__version__} could not deserialize this engine "
                               "(see the TensorRT messages above); rebuild it with timar-build")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtype = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        # Largest shapes: profile 0's max for dynamic inputs; the outputs' follow from them.
        self.max_shape = {}
        for n in self.inputs:
            shape = tuple(self.engine.get_tensor_shape(n))
            if any(d < 0 for d in shape):
                shape = tuple(self.engine.get_tensor_profile_shape(n, 0)[2])
            self.max_shape[n] = shape
            self.context.set_input_shape(n, shape)
        for n in self.outputs:
            self.max_shape[n] = tuple(self.context.get_tensor_shape(n))
        self.device, self.host = {}, {}
        for n in names:
            if n in external:
                continue
            size = int(np.prod(self.max_shape[n]))
            self.device[n] = cuda.mem_alloc(max(size, 1) * self.dtype[n].itemsize)
            self.context.set_tensor_address(n, int(self.device[n]))   # fixed for the context's life
            if n not in device_only:
                self.host[n] = cuda.pagelocked_empty(size, self.dtype[n])

    def run(self, stream, inputs: dict[str, np.ndarray], fetch=(), bound=None) -> dict[str, np.ndarray]:
        """Copy ``inputs`` host-to-device, set the input shapes, bind ``bound`` ({name: (device
        pointer, shape)}), enqueue on ``stream`` and copy the ``fetch`` outputs back to the host."""
        bound = bound or {}
        for n in self.inputs:
            if n in bound:
                ptr, shape = bound[n]
                self.context.set_tensor_address(n, ptr)
            else:
                if n not in inputs:
                    raise ValueError(f"{self.name}: engine input {n!r} was not given")
                value = np.ascontiguousarray(inputs[n], self.dtype[n])
                shape = value.shape
                if value.size > self.host[n].size:
                    raise ValueError(f"{self.name}: input {n!r} of shape {shape} is larger than the engine's "
                                     f"profile allows ({self.max_shape[n]})")
                staged = self.host[n][:value.size]
                staged[:] = value.ravel()
                self.cuda.memcpy_htod_async(self.device[n], staged, stream)
            if not self.context.set_input_shape(n, tuple(int(d) for d in shape)):
                raise ValueError(f"{self.name}: input {n!r} of shape {tuple(shape)} is outside the engine's "
                                 f"optimisation profile (max {self.max_shape[n]})")
        if not self.context.execute_async_v3(stream.handle):
            raise RuntimeError(f"{self.name}: TensorRT execute_async_v3 failed (see the TensorRT messages above)")
        out = {}
        for n in fetch:
            shape = tuple(self.context.get_tensor_shape(n))
            out[n] = (self.host[n][:int(np.prod(shape))], shape)
            self.cuda.memcpy_dtoh_async(out[n][0], self.device[n], stream)
        stream.synchronize()
        return {n: host.reshape(shape).copy() for n, (host, shape) in out.items()}


class TensorRTBackend:
    """The bundle's TensorRT engines for this GPU and TensorRT version (``timar-build``).

    One ``IExecutionContext`` per graph, fixed device buffers of each engine's largest shapes,
    page-locked staging buffers, one CUDA stream; pycuda runs in the device's primary context
    (the one TensorRT's CUDA runtime calls use), made current around every call so that any
    thread may drive the session. The cache is a ``DeviceCache``; ``present`` a ``DevicePresent``.

    Raises RuntimeError (one line) when TensorRT, pycuda or a GPU is missing, when the bundle has
    no engines for this GPU and TensorRT version, or when they cannot be loaded; ``make_backend``
    turns that into a ValueError for backend="tensorrt" and falls back to ONNX Runtime for "auto".

    TODO(cuda-graph): capture the denoiser call (fixed N = rows*F, fixed buffers) in a CUDA graph
    and replay it per sampling step. TensorRT documents this as: run ``execute_async_v3`` once
    after the shapes are set, then capture it with cudaStreamBeginCapture/EndCapture and launch the
    instantiated graph. The pycuda driver reference documents no stream capture, so it would
    need cuda-python's ``cudart`` next to pycuda; left out until it can be tested on a GPU.
    """

    name = "tensorrt"

    def __init__(self, bundle: Bundle):
        check_tensorrt_available()          # TensorRTUnavailable (a RuntimeError): what is missing
        import tensorrt as trt

        gpu = gpu_info(DEVICE)["name"]      # the name timar-build recorded the engines under
        entry = bundle.engine_set(gpu, trt.__version__)
        if entry is None:
            have = "; ".join(f"{e['gpu']} / TensorRT {e['tensorrt']}" for e in bundle["engines"]) or "none"
            raise RuntimeError(f"no TensorRT engines for {gpu!r} with TensorRT {trt.__version__} in "
                               f"{bundle.dir} (it has: {have}); build them on this machine with "
                               f"timar-build --bundle {bundle.dir}")
        if bundle.cache_dtype != np.float32:
            raise RuntimeError(f"{bundle.dir} keeps a {bundle.cache_dtype} KV cache; the TensorRT backend keeps a "
                               "float32 cache on the GPU: use the bundle converted with a float32 cache, or "
                               "ONNX Runtime")
        missing = [g for g in GRAPHS if g not in entry["files"]]
        if missing:
            raise RuntimeError(f"engine set {entry['dir']} lacks {missing}; rebuild it with "
                               f"timar-build --bundle {bundle.dir}")
        import pycuda.driver as cuda

        cuda.init()
        self._cuda = cuda
        self._ctx = cuda.Device(DEVICE).retain_primary_context()
        self._lock = threading.RLock()
        self.providers = [f"TensorRT {trt.__version__} ({gpu})"]
        self.device = "cuda"
        cache = bundle["cache"]
        self.tokens_per_slot = cache["tokens_per_slot"]
        self.cache_shape = tuple(d if isinstance(d, int) else 1 for d in cache["past_key_values_shape"])
        self.cache_inputs = tuple(cache["past_key_values_inputs"])
        with self._active():
            self._stream = cuda.Stream()
            self._logger = trt.Logger(trt.Logger.WARNING)
            self._runtime = trt.Runtime(self._logger)
            path = {g: bundle.file_path(entry["files"][g]["file"], f"engines.files.{g}.file") for g in GRAPHS}
            self._engines = {
                "audio_encoder": _Engine(trt, cuda, self._runtime, path["audio_encoder"]),
                "encoder_step": _Engine(trt, cuda, self._runtime, path["encoder_step"],
                                        external=self.cache_inputs, device_only=("present_key_values",)),
                "denoiser": _Engine(trt, cuda, self._runtime, path["denoiser"]),
            }
        step = self._engines["encoder_step"]
        self.max_batch = step.max_shape[self.cache_inputs[0]][0]
        if self._engines["audio_encoder"].max_shape["waveform"][0] < 2:
            raise RuntimeError(f"engine set {entry['dir']} was built with max_batch 1, but the audio encoder "
                               "runs [user, agent] as a batch of 2; rebuild with timar-build --max-batch 2")

    @contextmanager
    def _active(self):
        """Make the primary context current on this thread for the duration of a call. One call
        at a time: the engines share one stream and their bound buffers, and a Model may serve
        sessions on several threads."""
        with self._lock:
            self._ctx.push()
            try:
                yield
            finally:
                self._cuda.Context.pop()

    # ---- the three graphs --------------------------------------------------------------------
    def encode_audio(self, waveform: np.ndarray) -> np.ndarray:
        """waveform float32 [2, S] -> speech features float32 [2, F, Da]."""
        with self._active():
            return self._engines["audio_encoder"].run(self._stream, {"waveform": waveform},
                                                      fetch=("speech_features",))["speech_features"]

    def encoder_step(self, inputs: dict[str, np.ndarray], cache: DeviceCache):
        """inputs: the step's host arrays with batch B = the cache's rows; cache [L, 2, B, H, C, hd]
        on the GPU, bound in place. Returns z float32 [B, F, D] and a DevicePresent
        [L, 2, B, H, P, hd] left on the GPU."""
        batch = len(inputs["uncond"])
        if batch != cache.shape[2]:
            raise ValueError(f"encoder_step: batch {batch} does not match the cache's {cache.shape[2]} rows")
        step = self._engines["encoder_step"]
        # Input i is cache[i // 2, i % 2]: consecutive blocks of the one buffer.
        part_shape = cache.shape[2:]
        part_bytes = int(np.prod(part_shape)) * FLOAT_BYTES
        bound = {name: (int(cache.alloc) + i * part_bytes, part_shape) for i, name in enumerate(self.cache_inputs)}
        with self._active():
            z = step.run(self._stream, inputs, fetch=("z",), bound=bound)["z"]
        return z, DevicePresent(int(step.device["present_key_values"]), batch)

    def denoise(self, x: np.ndarray, t: np.ndarray, z: np.ndarray) -> np.ndarray:
        """x_t float32 [N, 56], t float32 [N], z float32 [N, D] -> model output float32 [N, 112]."""
        with self._active():
            return self._engines["denoiser"].run(self._stream, {"x_t": x, "t": t, "z": z},
                                                 fetch=("model_output",))["model_output"]

    # ---- the cache on the GPU ------------------------------------------------------------------
    def new_cache(self, rows: int) -> DeviceCache:
        """A zeroed cache [L, 2, rows, H, (W-1)*P, hd] on the GPU."""
        if rows > self.max_batch:
            raise ValueError(f"backend: these TensorRT engines take at most {self.max_batch} rows, this session "
                             f"needs {rows} (cfg != 1 runs 2); rebuild with timar-build --max-batch {rows}")
        shape = (*self.cache_shape[:2], rows, *self.cache_shape[3:])
        count = int(np.prod(shape))
        with self._active():
            alloc = self._cuda.mem_alloc(count * FLOAT_BYTES)
            self._cuda.memset_d32(alloc, 0, count)
        return DeviceCache(alloc, shape)

    def commit(self, cache: DeviceCache, present: DevicePresent, slot: int) -> DeviceCache:
        """Write the conditional row of ``present`` into ``slot`` of every cache row, in place.

        One ``Memcpy3D`` per cache row (see ``slot_copy``) instead of one ``memcpy_dtod_async`` per
        (layer, k/v, row, head) block: the same bytes, but 1-2 calls a turn rather than L*2*rows*H
        (2048 for the paper's large model), each of which costs a Python call and a copy launch.
        """
        with self._active():
            for row in range(cache.shape[2]):
                copy = self._cuda.Memcpy3D()
                copy.set_src_device(present.ptr)
                copy.set_dst_device(int(cache.alloc))
                for field, value in slot_copy(cache.shape, self.tokens_per_slot, present.batch, slot, row).items():
                    setattr(copy, field, value)
                copy(self._stream)
            self._stream.synchronize()
        return cache

    def cache_to_numpy(self, cache: DeviceCache) -> np.ndarray:
        """The cache as a host array float32 [L, 2, rows, H, (W-1)*P, hd] (for get_state)."""
        out = np.empty(cache.shape, np.float32)
        with self._active():
            self._stream.synchronize()
            self._cuda.memcpy_dtoh(out, cache.alloc)
        return out

    def cache_from_numpy(self, array: np.ndarray) -> DeviceCache:
        """A new device cache holding ``array`` [L, 2, rows, H, (W-1)*P, hd] (for set_state)."""
        host = np.ascontiguousarray(array, np.float32)
        if host.ndim != 6 or host.shape[:2] + host.shape[3:] != self.cache_shape[:2] + self.cache_shape[3:]:
            raise ValueError(f"cache: expected shape [L, 2, rows, H, C, hd] = {list(self.cache_shape)} with any "
                             f"rows, got {list(host.shape)}")
        cache = self.new_cache(host.shape[2])
        with self._active():
            self._cuda.memcpy_htod(cache.alloc, host)
        return cache
