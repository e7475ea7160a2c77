"""Preview rendering: watch generated head motion as a video with sound.

A CPU-only numpy rasteriser draws a procedural head (or the real FLAME mesh when the user has
the FLAME model file) driven by the 56-float motion vector; the ffmpeg shipped by
imageio-ffmpeg encodes H.264 and muxes the audio. Needs the ``render`` extra (pillow,
imageio-ffmpeg) besides numpy and soundfile. ``import timar_sdk`` does not import this package.

    from timar_sdk.render import render_video, render_frame
    render_video("agent.npy", "preview.mp4", audio="agent.wav",
                 partner="user.npy", partner_audio="user.wav")
    img = render_frame(motion[0])          # (512, 512, 3) uint8
"""
from timar_sdk.render.flame import FlameFileError, FlameHead, FlameModel, convert_flame_pickle
from timar_sdk.render.frame import Renderer, render_frame
from timar_sdk.render.head import AGENT_STYLE, USER_STYLE, HeadStyle, ProceduralHead
from timar_sdk.render.video import load_audio, load_motion, mix_audio, render_frames, render_video

__all__ = [
    "AGENT_STYLE", "USER_STYLE", "FlameFileError", "FlameHead", "FlameModel", "HeadStyle",
    "ProceduralHead", "Renderer", "convert_flame_pickle", "load_audio", "load_motion",
    "mix_audio", "render_frame", "render_frames", "render_video",
]
