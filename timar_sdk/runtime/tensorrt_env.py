"""Is TensorRT usable here, and on which GPU: shared by the TensorRT backend and `timar-build`."""
from __future__ import annotations

import importlib.util

INSTALL_HINT = ("install with pip install -e '.[tensorrt]' in the timar-sdk checkout, which needs NVIDIA's "
                "package index: pip install tensorrt --extra-index-url https://pypi.nvidia.com (plus an NVIDIA CUDA driver)")

class TensorRTUnavailable(RuntimeError):
    """TensorRT, pycuda or a CUDA GPU is missing; the message is one line saying which and how to fix it."""


def _one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())


def check_tensorrt_available() -> None:
    """Raise ``TensorRTUnavailable`` (one line: what is missing, how to install it) unless the
    ``tensorrt`` package with its libraries, pycuda and a CUDA GPU are all usable."""
    try:
        import tensorrt as trt
    except ImportError as e:
        if importlib.util.find_spec("tensorrt") is None:
            raise TensorRTUnavailable(f"TensorRT is missing: the `tensorrt` Python package is not installed; "
                                      f"{INSTALL_HINT}") from None
        raise TensorRTUnavailable(f"TensorRT is missing: the `tensorrt` package is installed but its libraries "
                                  f"do not load ({_one_line(e)}); {INSTALL_HINT}") from None
    except OSError as e:
        raise TensorRTUnavailable(f"TensorRT is missing: the `tensorrt` libraries do not load ({_one_line(e)}); "
                                  f"{INSTALL_HINT}") from None
    if not hasattr(trt, "Builder") or not hasattr(trt, "OnnxParser"):
        raise TensorRTUnavailable("TensorRT is missing: the installed `tensorrt` package has no Builder/OnnxParser "
                                  f"(the PyPI stub without NVIDIA's libraries); {INSTALL_HINT}")
    if importlib.util.find_spec("pycuda") is None:
        raise TensorRTUnavailable("pycuda is missing (timar-build uses it to identify the GPU): "
                                  "pip install -e '.[tensorrt]' or pip install pycuda (builds against the CUDA toolkit)")
    try:
        import pycuda.driver as cuda

        cuda.init()
        count = cuda.Device.count()
    except Exception as e:  # ImportError (no libcuda), pycuda.driver.Error (no driver/device)
        raise TensorRTUnavailable(f"no usable CUDA driver: pycuda could not initialise CUDA ({_one_line(e)}); "
                                  "install the NVIDIA GPU driver on a machine with an NVIDIA GPU") from None
    if count < 1:
        raise TensorRTUnavailable("no CUDA GPU found (pycuda sees 0 devices); TensorRT engines are built on the GPU "
                                  "they will run on")


def gpu_info(device: int = 0) -> dict[str, str]:
    """Name (e.g. ``"NVIDIA H100 80GB HBM3"``) and compute capability (``"9.0"``) of a CUDA device."""
    import pycuda.driver as cuda

    cuda.init()
    dev = cuda.Device(device)
    major, minor = dev.compute_capability()
    return {"name": dev.name(), "compute_capability": f"{major}.{minor}"}
