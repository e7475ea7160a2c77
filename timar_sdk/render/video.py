"""Preview videos: render motion frames, mux the audio, encode H.264 with the ffmpeg that
imageio-ffmpeg ships."""
from __future__ import annotations

import os
import subprocess
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from timar_sdk.layout import FPS, MOTION_DIM, SAMPLE_RATE

_EXTRA_HINT = 'install the render extra: pip install -e ".[render]" in the timar-sdk checkout'


def require_render_extra() -> None:
    """Raise ImportError, saying how to install them, when pillow or imageio-ffmpeg (the render
    extra's packages that writing a video needs) is missing."""
    for module, name in (("PIL", "Pillow"), ("imageio_ffmpeg", "imageio-ffmpeg")):
        try:
            __import__(module)
        except ImportError as e:
            raise ImportError(f"{name} is needed to write a video: {_EXTRA_HINT}", name=module) from e


# --------------------------------------------------------------------------------- inputs
def load_motion(src) -> np.ndarray:
    """Motion as a (T, 56) float32 array, from an array, a ``.npy`` (T, 56), or a ``.npz`` with
    key ``motion`` or in the DualTalk format (``exp`` (T, 50) and ``pose`` (T, 6) with
    pose[:, 0:3] = neck/global, pose[:, 3:6] = jaw)."""
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        name = str(path)
        suffix = path.suffix.lower()
        if suffix not in (".npy", ".npz"):
            raise ValueError(f"{name}: expected a .npy (T, {MOTION_DIM}) array or an .npz, got a "
                             f"{suffix or 'suffix-less'} file")
        try:
            data = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"{name}: cannot read it as a numpy {suffix} file ({e})") from e
        if isinstance(data, np.ndarray):
            arr = data
        else:                                         # an .npz archive
            with data as z:
                if "motion" in z.files:
                    arr = z["motion"]
                elif "exp" in z.files and "pose" in z.files:
                    from timar_sdk.data.dualtalk import motion_from_npz
                    arr = motion_from_npz(z, name)
                else:
                    raise ValueError(f"{name}: expected key 'motion' or keys 'exp' and 'pose', "
                                     f"found {', '.join(z.files) or 'none'}")
    else:
        arr, name = src, "motion"
    try:
        arr = np.asarray(arr, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: expected numbers, got {np.asarray(arr).dtype} values") from e
    if arr.ndim == 1 and arr.shape[0] == MOTION_DIM:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != MOTION_DIM:
        raise ValueError(f"{name}: motion must be (T, {MOTION_DIM}), got {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name}: motion has no frames")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: motion contains NaN or infinite values")
    return arr


def load_audio(src) -> tuple[np.ndarray, int] | None:
    """Mono float32 audio and its sample rate, from a file path, an (array, rate) pair, or an
    array (taken to be at 16 kHz)."""
    if src is None:
        return None
    if isinstance(src, (str, os.PathLike)):
        from timar_sdk.audio import load_audio as load_file   # downmixes, resamples to 16 kHz
        return load_file(src, SAMPLE_RATE), SAMPLE_RATE
    if isinstance(src, tuple) and len(src) == 2:
        data, sr = src
    else:
        data, sr = src, SAMPLE_RATE
    data = np.asarray(data, dtype=np.float32)
    if data.ndim == 2:
        data = data.mean(axis=1) if data.shape[1] <= 8 else data.mean(axis=0)
    return data.reshape(-1), int(sr)


def _resample(x: np.ndarray, sr: int, target: int) -> np.ndarray:
    if sr == target or len(x) == 0:
        return x
    import soxr
    return soxr.resample(x, sr, target).astype(np.float32)


def mix_audio(tracks, n_frames: int, fps: float) -> tuple[np.ndarray, int]:
    """Mix mono tracks [(samples, rate), ...] into one, exactly n_frames / fps long (trimmed or
    padded with silence), scaled down only if the sum would clip."""
    tracks = [t for t in tracks if t is not None]
    sr = max(t[1] for t in tracks)
    length = int(round(n_frames / fps * sr))
    mix = np.zeros(length, dtype=np.float32)
    for data, rate in tracks:
        x = _resample(data, rate, sr)[:length]
        mix[: len(x)] += x
    peak = float(np.max(np.abs(mix))) if length else 0.0
    if peak > 0.99:
        mix *= 0.99 / peak
    return mix, sr


def _levels(track, n_frames: int, fps: float) -> np.ndarray:
    """Per-frame loudness in [0, 1] (RMS in dB, -50..-10 dBFS mapped to 0..1), smoothed."""
    if track is None:
        return np.zeros(n_frames, np.float32)
    data, sr = track
    hop = sr / fps
    out = np.zeros(n_frames, np.float32)
    for k in range(n_frames):
        seg = data[int(k * hop): int((k + 1) * hop)]
        if len(seg):
            rms = float(np.sqrt(np.mean(seg.astype(np.float64) ** 2)))
            out[k] = np.clip((20 * np.log10(rms + 1e-9) + 50.0) / 40.0, 0.0, 1.0)
    for k in range(1, n_frames):  # fast attack, slow release
        out[k] = max(out[k], 0.8 * out[k - 1])
    return out


# ------------------------------------------------------------------------------- overlays
class _Overlay:
    """Text labels, a speaking-level bar and a timecode, alpha-blended with numpy."""

    def __init__(self, size: int):
        try:
            from PIL import Image, ImageDraw, ImageFont
        except ImportError as e:  # pragma: no cover
            raise ImportError(f"Pillow is needed for labels: {_EXTRA_HINT}", name="PIL") from e
        self._Image, self._Draw = Image, ImageDraw
        self.scale = size / 512.0
        px = max(10, int(round(22 * self.scale)))
        try:
            self.font = ImageFont.load_default(size=px)
            self.small = ImageFont.load_default(size=max(9, int(round(15 * self.scale))))
        except TypeError:  # Pillow < 10.1: fixed bitmap font
            self.font = self.small = ImageFont.load_default()
        self._cache: dict = {}

    def _mask(self, text, font):
        key = (text, id(font))
        m = self._cache.get(key)
        if m is None:
            _, _, right, bottom = font.getbbox(text)
            img = self._Image.new("L", (right + 4, bottom + 4), 0)
            self._Draw.Draw(img).text((2, 2), text, fill=255, font=font)
            m = np.asarray(img, dtype=np.float32) / 255.0
            if len(self._cache) > 256:
                self._cache.clear()
            self._cache[key] = m
        return m

    @staticmethod
    def _blend(img, mask, x, y, color, alpha=1.0):
        h, w = mask.shape
        h = min(h, img.shape[0] - y)
        w = min(w, img.shape[1] - x)
        if h <= 0 or w <= 0:
            return
        region = img[y:y + h, x:x + w].astype(np.float32)
        a = (mask[:h, :w] * alpha)[..., None]
        col = np.asarray(color, np.float32)
        img[y:y + h, x:x + w] = (region * (1 - a) + col * a).astype(np.uint8)

    def text(self, img, text, x, y, small=False, color=(240, 240, 240)):
        font = self.small if small else self.font
        m = self._mask(text, font)
        # soft shadow for legibility on any background
        self._blend(img, m, x + 1, y + 1, (0, 0, 0), 0.6)
        self._blend(img, m, x, y, color)
        return m.shape

    def bar(self, img, x, y, level, color):
        w = int(round(90 * self.scale))
        h = max(3, int(round(6 * self.scale)))
        back = np.ones((h, w), np.float32)
        self._blend(img, back, x, y, (0, 0, 0), 0.35)
        fill = int(round(w * float(level)))
        if fill > 0:
            self._blend(img, np.ones((h, fill), np.float32), x, y, color, 0.9)


# ---------------------------------------------------------------------------------- encode
class _Encoder:
    """Feeds RGB frames to ffmpeg (libx264, yuv420p) and muxes an optional WAV."""

    def __init__(self, out_path: Path, width: int, height: int, fps: float,
                 audio_path: Path | None, crf: int = 18, preset: str = "veryfast"):
        try:
            import imageio_ffmpeg
        except ImportError as e:
            raise ImportError(f"imageio-ffmpeg is needed to write video: {_EXTRA_HINT}", name="imageio_ffmpeg") from e
        exe = imageio_ffmpeg.get_ffmpeg_exe()
        cmd = [exe, "-y", "-hide_banner", "-loglevel", "error", "-nostdin",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}",
               "-framerate", f"{fps:g}", "-i", "-"]
        if audio_path is not None:
            cmd += ["-i", str(audio_path)]
        cmd += ["-map", "0:v:0"]
        if audio_path is not None:
            cmd += ["-map", "1:a:0", "-c:a", "aac", "-b:a", "160k"]
        cmd += ["-c:v", "libx264", "-preset", preset, "-crf", str(int(crf)),
                "-pix_fmt", "yuv420p", "-movflags", "+faststart", str(out_path)]
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     stderr=self._log)

    def _error(self, what: str) -> RuntimeError:
        self._log.seek(0)
        msg = self._log.read().decode("utf-8", "replace").strip()
        return RuntimeError(f"ffmpeg {what}: {msg or 'no message'}")

    def write(self, frame: np.ndarray):
        try:
            self.proc.stdin.write(np.ascontiguousarray(frame, dtype=np.uint8).tobytes())
        except (BrokenPipeError, OSError):
            self.proc.wait()
            raise self._error("stopped while receiving frames") from None

    def close(self):
        try:
            self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        rc = self.proc.wait()
        try:
            if rc != 0:
                raise self._error(f"failed (exit {rc})")
        finally:
            self._log.close()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


# ------------------------------------------------------------------------------------ API
def _make_rig(flame, style):
    if flame is None:
        from timar_sdk.render.head import ProceduralHead
        return ProceduralHead(style)
    from timar_sdk.render.flame import FlameHead, FlameModel
    model = flame if isinstance(flame, FlameModel) else FlameModel.load(flame)
    return FlameHead(model, skin=style.skin, iris=style.iris)


def render_frames(motion, partner=None, size: int = 512, flame=None, labels=None,
                  audio_levels=None, fps: float = FPS, timecode: bool = False):
    """Yield (H, W, 3) uint8 frames: one head, or agent and partner side by side."""
    from timar_sdk.render.frame import Renderer
    from timar_sdk.render.head import AGENT_STYLE, USER_STYLE
    motion = load_motion(motion)
    n = len(motion)
    size = int(size) + (int(size) % 2)  # H.264 with yuv420p needs even sizes
    if partner is not None:
        partner = load_motion(partner)
        if len(partner) < n:  # hold the partner's last frame
            partner = np.concatenate([partner, np.repeat(partner[-1:], n - len(partner), 0)])
        partner = partner[:n]
    flame_model = None
    if flame is not None:
        from timar_sdk.render.flame import FlameModel
        flame_model = flame if isinstance(flame, FlameModel) else FlameModel.load(flame)
    agent_r = Renderer(_make_rig(flame_model, AGENT_STYLE), size)
    user_r = Renderer(_make_rig(flame_model, USER_STYLE), size) if partner is not None else None
    overlay = _Overlay(size) if (labels or timecode) else None
    levels = audio_levels if audio_levels is not None else [None, None]
    colors = [(110, 170, 240), (240, 160, 110)]
    pad = int(round(12 * size / 512))
    for k in range(n):
        panels = [agent_r.render(motion[k])]
        if user_r is not None:
            panels.append(user_r.render(partner[k]))
        for p, panel in enumerate(panels):
            if overlay is not None and labels:
                h, _ = overlay.text(panel, labels[p], pad, pad)
                lv = levels[p] if p < len(levels) else None
                if lv is not None:
                    overlay.bar(panel, pad + 2, pad + h + 2, lv[k], colors[p])
        frame = panels[0] if len(panels) == 1 else np.concatenate(panels, axis=1)
        if len(panels) == 2:
            frame[:, size - 1:size + 1] = (20, 20, 24)
        if overlay is not None and timecode:
            t = k / fps
            overlay.text(frame, f"{int(t // 60):d}:{t % 60:05.2f}  #{k}", pad,
                         size - pad - int(round(18 * size / 512)), small=True,
                         color=(200, 200, 200))
        yield frame


def render_video(motion, out_path, audio=None, partner=None, partner_audio=None,
                 fps: float = FPS, size: int = 512, flame=None, progress: bool = True,
                 crf: int = 18, labels=("agent", "user"), timecode: bool = True) -> Path:
    """Render a preview MP4 (H.264 + AAC) of the agent's motion, optionally beside the
    partner's (user's) motion, with both speakers' audio mixed in.

    motion, partner: (T, 56) arrays or .npy/.npz paths (see :func:`load_motion`). The video has
    exactly one frame per motion frame at ``fps``; a shorter partner holds its last frame.
    audio, partner_audio: paths, (samples, rate) pairs, or 16 kHz arrays; the mix is trimmed or
    padded to the video's duration, so the streams stay in sync. size: the square size of one
    head's panel (two panels side by side with a partner). flame: a FLAME model file (or
    FlameModel) to render the FLAME mesh instead of the procedural head. Returns the path.
    """
    require_render_extra()
    motion = load_motion(motion)
    n = len(motion)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    size = int(size) + (int(size) % 2)
    if size < 32:
        raise ValueError("size must be at least 32 pixels")
    if flame is not None:  # read (and check) the model before ffmpeg starts
        from timar_sdk.render.flame import FlameModel
        if not isinstance(flame, FlameModel):
            flame = FlameModel.load(flame)
    tracks = [load_audio(audio), load_audio(partner_audio)]
    width = size * (2 if partner is not None else 1)
    two = partner is not None
    use_labels = tuple(labels[:2 if two else 1]) if labels else None
    levels = [_levels(tracks[0], n, fps) if tracks[0] is not None else None,
              _levels(tracks[1], n, fps) if two and tracks[1] is not None else None]
    frames = render_frames(motion, partner, size=size, flame=flame, labels=use_labels,
                           audio_levels=levels, fps=fps, timecode=timecode)
    with tempfile.TemporaryDirectory(prefix="timar-render-") as tmp:
        wav = None
        if any(t is not None for t in tracks):
            import soundfile as sf
            mix, sr = mix_audio(tracks, n, fps)
            wav = Path(tmp) / "mix.wav"
            sf.write(str(wav), mix, sr, subtype="PCM_16")
        from timar_sdk.progress import progress_bar
        bar = progress_bar(total=n, unit="frame", desc=f"render {out_path.name}", disable=not progress)
        enc = _Encoder(out_path, width, size, fps, wav, crf=crf)
        try:
            for frame in frames:
                enc.write(frame)
                bar.update(1)
        except BaseException:
            enc.kill()
            if out_path.is_file():
                out_path.unlink()  # no half-written video
            raise
        finally:
            bar.close()
        enc.close()
    return out_path
