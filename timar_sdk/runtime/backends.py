"""Backends run the bundle's three graphs; everything else (ring, sampler, noise) is shared.

Every backend offers the same small interface, with numpy in and out at its edges:
  encode_audio(waveform [2, S]) -> speech features [2, F, Da]
  encoder_step(inputs: dict of numpy, cache) -> z [B, F, D], present (backend-native); the
      cache [L, 2, rows, H, (W-1)*P, hd] goes in as one input per layer and key/value
  denoise(x_t [N, 56], t [N], z [N, D]) -> [N, 112]
  new_cache(rows) / commit(cache, present, slot) / cache_to_numpy(cache) / cache_from_numpy(a)
The cache holds `rows` identical copies (rows = 2 when classifier-free guidance is on, so the
conditional and unconditional rows read the same past); commit writes the conditional row's
present keys/values into one slot of every row.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from timar_sdk.runtime.bundle import Bundle, BundleError

BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch")


class HostCacheBackend:
    """The cache as one host numpy array [L, 2, rows, H, (W-1)*P, hd], written in place, of the
    bundle's cache dtype (float32, or float16 in a half-size-cache bundle)."""

    def _init_cache(self, bundle: Bundle) -> None:
        self.cache_dtype = bundle.cache_dtype
        self.cache_shape = [d if isinstance(d, int) else 1 for d in bundle["cache"]["past_key_values_shape"]]
        self.tokens_per_slot = bundle["cache"]["tokens_per_slot"]
        self.cache_inputs = bundle["cache"]["past_key_values_inputs"]
        self._staging = threading.local()        # stack_caches' buffer, one per thread

    def cache_views(self, cache: np.ndarray) -> dict[str, np.ndarray]:
        """encoder_step's cache inputs: input i is cache[i // 2, i % 2], a contiguous view."""
        return {name: cache[i // 2, i % 2] for i, name in enumerate(self.cache_inputs)}

    def stack_caches(self, caches: list[np.ndarray]) -> np.ndarray:
        """Several sessions' caches as one batched cache [L, 2, sum(rows), H, T, hd], for one
        encoder_step call. The copy goes into a buffer this thread keeps and reuses (grown to
        the largest batch it has run): a fresh 200 MB array per batch of 32 would cost the page
        faults of new memory every time, which made batched turns slower and erratic. Valid
        until this thread stacks again; encoder_step only reads it."""
        rows = sum(c.shape[2] for c in caches)
        buffer = getattr(self._staging, "buffer", None)
        if buffer is None or buffer.shape[2] < rows:
            shape = list(caches[0].shape)
            shape[2] = rows
            buffer = self._staging.buffer = np.empty(shape, self.cache_dtype)
        out = buffer[:, :, :rows]
        np.concatenate(caches, axis=2, out=out)
        return out

    def new_cache(self, rows: int) -> np.ndarray:
        shape = list(self.cache_shape)
        shape[2] = rows
        return np.zeros(shape, self.cache_dtype)

    def commit(self, cache: np.ndarray, present: np.ndarray, slot: int) -> np.ndarray:
        p = self.tokens_per_slot
        cache[:, :, :, :, slot * p:(slot + 1) * p] = present[:, :, :1]
        return cache

    @staticmethod
    def cache_to_numpy(cache: np.ndarray) -> np.ndarray:
        return cache.copy()

    def cache_from_numpy(self, array: np.ndarray) -> np.ndarray:
        return np.array(array, self.cache_dtype, copy=True)


class OrtBackend(HostCacheBackend):
    """ONNX Runtime: CPU by default, the CUDA provider when installed and asked for."""

    name = "onnxruntime"

    def __init__(self, bundle: Bundle, providers: list[str] | None = None, threads: int | None = None,
                 spin: bool = False):
        import onnxruntime as ort

        available = ort.get_available_providers()
        if providers is None:
            providers = ["CPUExecutionProvider"]
        missing = [p for p in providers if p not in available]
        if missing:
            raise ValueError(f"providers: {missing} not available in this onnxruntime (has {available})")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL   # one turn at a time: no inter-op pool
        opts.inter_op_num_threads = 1
        if threads:
            opts.intra_op_num_threads = threads
        # A graph is dozens of small operators: pool threads that spin between them instead of
        # sleeping save a wake-up per operator (3-6 ms of the tiny model's turn on a free 2-core
        # CPU). But beside any other busy process the spinning threads fight it for the cores and
        # a turn takes 2.5x as long (BENCHMARKS.md, contention), so spinning is opt-in, for
        # machines that run nothing else. When on, it stops when a run returns, or one graph's
        # threads would steal the cores from the next graph of the turn.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        opts.add_session_config_entry("session.force_spinning_stop", "1")
        self.sessions = {}
        for name in bundle["graphs"]:
            path = bundle.graph_path(name)
            try:
                self.sessions[name] = ort.InferenceSession(str(path), opts, providers=providers)
            except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
                raise BundleError(f"{path}: ONNX Runtime cannot load this graph ({e})") from None
        self.providers = self.sessions["denoiser"].get_providers()
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        if "encoder_step" in self.sessions:
            self._init_cache(bundle)
            self._step_outputs = [o.name for o in self.sessions["encoder_step"].get_outputs()]

    def encode_audio(self, waveform: np.ndarray) -> np.ndarray:
        return self.sessions["audio_encoder"].run(None, {"waveform": waveform})[0]

    def encoder_step(self, inputs: dict[str, np.ndarray], cache: np.ndarray):
        # IO binding: inputs are read in place (the cache is never copied on the CPU) and the
        # outputs land in buffers ONNX Runtime allocates on the provider's device.
        sess = self.sessions["encoder_step"]
        binding = sess.io_binding()
        for name, value in inputs.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name, view in self.cache_views(cache).items():
            binding.bind_cpu_input(name, view)
        for name in self._step_outputs:
            binding.bind_output(name, self.device)
        sess.run_with_iobinding(binding)
        z, present = binding.copy_outputs_to_cpu()
        return z, present

    def embed_turn(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """window_recompute bundles: one turn's tokens [rows, P, D]."""
        return self.sessions["token_embed"].run(None, inputs)[0]

    def encode_window(self, tokens: np.ndarray) -> np.ndarray:
        """window_recompute bundles: tokens [rows, N, D] -> z [rows, F, D] of the last turn."""
        return self.sessions["window_encoder"].run(None, {"tokens": tokens})[0]

    def denoise(self, x: np.ndarray, t: np.ndarray, z: np.ndarray) -> np.ndarray:
        return self.sessions["denoiser"].run(None, {"x_t": x, "t": t, "z": z})[0]


class TorchBackend(HostCacheBackend):
    """The torch modules that export traces (timar_sdk.model.graphs), run through the same loop:
    the reference for the other backends. It runs the modules of a bundle made in memory
    (`Model.from_torch`), or loads the checkpoint a bundle folder was exported from (both need
    the train extra)."""

    name = "torch"

    def __init__(self, bundle: Bundle, threads: int | None = None):
        try:
            import torch
        except ImportError:
            raise ValueError("backend: 'torch' needs PyTorch: pip install -e '.[train]' in the timar-sdk checkout") from None
        self.torch = torch
        if threads:
            torch.set_num_threads(threads)
        self.graphs = bundle.modules if bundle.modules is not None else _checkpoint_modules(bundle)
        if bundle["attention"] == "cached":
            self._init_cache(bundle)
            self.cache_dtype = np.dtype(np.float32)     # the FP32 modules, whatever the bundle's graphs
        self.providers = ["torch-cpu"]
        self.device = "cpu"

    def _run(self, name: str, *arrays):
        with self.torch.no_grad():
            out = self.graphs[name](*(self.torch.from_numpy(np.ascontiguousarray(a)) for a in arrays))
        return tuple(o.numpy() for o in out) if isinstance(out, tuple) else out.numpy()

    def encode_audio(self, waveform):
        return self._run("audio_encoder", waveform)

    def encoder_step(self, inputs, cache):
        from timar_sdk.model.graphs import STEP_INPUTS
        return self._run("encoder_step", *(inputs[k] for k in STEP_INPUTS), *self.cache_views(cache).values())

    def embed_turn(self, inputs):
        from timar_sdk.model.graphs import TOKEN_INPUTS
        return self._run("token_embed", *(inputs[k] for k in TOKEN_INPUTS))

    def encode_window(self, tokens):
        return self._run("window_encoder", tokens)

    def denoise(self, x, t, z):
        return self._run("denoiser", x, t, z)


def _checkpoint_modules(bundle: Bundle) -> dict:
    """The graphs' torch modules of the checkpoint a bundle folder was exported from."""
    from timar_sdk.model.graphs import graph_modules, window_graph_modules

    src = bundle.manifest.get("source_checkpoint", "")
    path = resolve_checkpoint(src, bundle.dir)
    if path is None:
        raise ValueError(f"backend: 'torch' needs the checkpoint this bundle was exported from "
                         f"({src or 'not recorded'}), which is not there")
    ema = bundle.manifest.get("source_weights", "ema") == "ema"
    if bundle["attention"] == "window_recompute":
        from timar_sdk.model.authors import load_authors_model
        stats = (bundle.motion_mean, bundle.motion_std) if bundle["model"].get("do_norm") else None
        model = load_authors_model(path, bundle["model"].get("wav2vec2_path"), ema=ema, motion_stats=stats)
        return window_graph_modules(model)
    from timar_sdk.model.checkpoint import load_model
    return graph_modules(load_model(path, ema=ema))


def resolve_checkpoint(source: str, bundle_dir: Path) -> Path | None:
    """A manifest's source_checkpoint as a path: 'package:<file>' names a file shipped in
    timar_sdk/assets; a relative path is relative to the bundle."""
    if not source:
        return None
    if source.startswith("package:"):
        path = Path(__file__).resolve().parent.parent / "assets" / source.split(":", 1)[1]
    else:
        path = Path(source)
        if not path.is_absolute():
            path = bundle_dir / path
    return path if path.is_file() else None


def make_backend(name: str, bundle: Bundle, threads: int | None = None, spin: bool = False):
    """'auto': torch for a bundle made in memory (Model.from_torch); for a bundle folder TensorRT
    engines for this GPU, else ONNX Runtime with CUDA, else ONNX Runtime CPU."""
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    if name == "torch" or (name == "auto" and bundle.modules is not None):
        return TorchBackend(bundle, threads)
    if bundle.modules is not None:
        raise ValueError(f"backend: {name!r} runs bundle folders; this bundle was made in memory from a torch "
                         f"model (Model.from_torch) and runs with 'torch'")
    if name == "tensorrt" and bundle["attention"] != "cached":
        raise ValueError("backend: 'tensorrt' runs cached bundles only; this window_recompute bundle "
                         "(an authors' checkpoint) runs with 'onnxruntime' or 'torch'")
    if name == "tensorrt" or (name == "auto" and bundle["engines"]):
        try:
            from timar_sdk.runtime.tensorrt_backend import TensorRTBackend
            return TensorRTBackend(bundle)
        except (ImportError, RuntimeError) as e:
            if name == "tensorrt":
                raise ValueError(f"backend: 'tensorrt' unavailable: {e}") from None
    import onnxruntime as ort
    cuda = "CUDAExecutionProvider" in ort.get_available_providers() and not os.environ.get("TIMAR_FORCE_CPU")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    return OrtBackend(bundle, providers, threads, spin)
