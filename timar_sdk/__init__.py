"""timar-sdk: deploy TIMAR conversational head motion in real time.

`import timar_sdk` never imports torch: the runtime needs only numpy, onnxruntime and soundfile.
"""
from timar_sdk.audio import load_audio
from timar_sdk.layout import FPS, MOTION_DIM, MOTION_NAMES, SAMPLE_RATE
from timar_sdk.errors import BundleError, TimarInputError, TimarRuntimeError
from timar_sdk.runtime.bundle import Bundle
from timar_sdk.runtime.session import Session

__version__ = "0.1.0"
__all__ = ["Bundle", "BundleError", "FPS", "MOTION_DIM", "MOTION_NAMES", "SAMPLE_RATE", "Session",
           "TimarInputError", "TimarRuntimeError", "load_audio", "__version__"]
