"""timar-sdk: deploy TIMAR conversational head motion in real time.

`import timar_sdk` never imports torch: the runtime needs only numpy, onnxruntime and soundfile.
"""
from timar_sdk.audio import load_audio
from timar_sdk.layout import FPS, MOTION_DIM, MOTION_NAMES, SAMPLE_RATE
from timar_sdk.errors import BundleError, TimarInputError, TimarRuntimeError
from timar_sdk.runtime.bundle import Bundle
from timar_sdk.runtime.model import Model
from timar_sdk.runtime.scheduler import MotionChunk, Scheduler, Stream
from timar_sdk.runtime.session import Session, step_many

__version__ = "0.1.0"
__all__ = ["Bundle", "BundleError", "FPS", "MOTION_DIM", "MOTION_NAMES", "Model", "MotionChunk", "SAMPLE_RATE",
           "Scheduler", "Session", "Stream", "TimarInputError", "TimarRuntimeError", "load_audio", "step_many",
           "__version__"]
