"""timar-sdk: deploy TIMAR conversational head motion in real time.

`import timar_sdk` never imports torch: the runtime needs only numpy, onnxruntime and soundfile.
"""
from timar_sdk.layout import FPS, MOTION_DIM, SAMPLE_RATE

__version__ = "0.1.0"
__all__ = ["FPS", "MOTION_DIM", "SAMPLE_RATE", "__version__"]
