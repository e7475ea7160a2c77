"""`Session`: stream a conversation turn by turn through a bundle (docs/DESIGN.md section 4).

    session = timar_sdk.Session()                  # the shipped default bundle, best backend
    motion = session.step(user_audio, user_motion, agent_audio)   # one turn -> [25, 56]
    frames = session.feed(user_audio=chunk, agent_audio=chunk)    # any-size pieces -> [k*25, 56]

Nothing in the session changes until a whole call has succeeded: a bad input, a backend error,
a turn whose result is not finite, or an interrupt leaves it exactly as it was. Everything a
conversation holds, except the KV cache (written in place), is one immutable `Conversation`
value, so a call commits by replacing it in one assignment.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, replace

import numpy as np

from timar_sdk.audio import RunningNorm, to_float32
from timar_sdk.errors import TimarInputError, TimarRuntimeError
from timar_sdk.layout import MOTION_DIM, MOTION_LIMIT
from timar_sdk.runtime.bundle import CFG_RANGE, TEMPERATURE_RANGE, Bundle
from timar_sdk.runtime.model import Model, check_integer
from timar_sdk.runtime.ring import TurnRing
from timar_sdk.runtime.rng import PhiloxNormal
from timar_sdk.runtime.smoothing import check_smoothing, filter_coefficients, smooth
from timar_sdk.sampler import respaced_schedule, sample_turns

__all__ = ["Conversation", "Model", "Session", "TimarInputError", "TimarRuntimeError"]

EMPTY_BUFFERS = (np.zeros(0, np.float32), np.zeros(0, np.float32), np.zeros((0, MOTION_DIM), np.float32))
SETTINGS = ("seed", "steps", "temperature", "cfg", "history", "context_turns", "smoothing")
"""What shapes the noise stream, the cache and the output: a snapshot is only valid under the
same values."""


@dataclass(frozen=True)
class Conversation:
    """One conversation's state, apart from the KV cache. Never changed in place.

    ring: ages of the cache slots. noise: Philox counter state. turns: turns committed.
    tokens: window_recompute bundles, past turns' tokens [P, D] each, oldest first.
    audio_norm: window_recompute bundles, running (user, agent) audio statistics.
    buffers: audio (float32 [samples]) and user motion (float32 [frames, 56]) not yet in a turn.
    motion_tracked: user motion was fed since the last reset (turns then wait for it).
    last_motion: the last user motion frame fed, float32 [56] (pads a lagging tracker in flush).
    smoothed: the last output frame of the smoothing filter, float32 [56] (None: smoothing off,
        or no turn yet).
    """
    ring: TurnRing
    noise: dict
    turns: int = 0
    tokens: tuple = ()
    audio_norm: tuple = ()
    buffers: tuple = EMPTY_BUFFERS
    motion_tracked: bool = False
    last_motion: np.ndarray | None = None
    smoothed: np.ndarray | None = None

    @property
    def user_audio(self) -> np.ndarray:
        return self.buffers[0]

    @property
    def agent_audio(self) -> np.ndarray:
        return self.buffers[1]

    @property
    def user_motion(self) -> np.ndarray:
        return self.buffers[2]


class Session:
    """One conversation streamed through a `Model`.

    model: a `Model` shared with other sessions, or what `Model` takes to load one for this
        session alone: a bundle folder (str or path), a `Bundle`, or None for the default bundle.
    backend, threads: for a session that loads its own model ("auto" and the backend's default
        threads when left as None); leave them None when passing a Model.
    seed: seed of the portable Philox generator, an integer in [0, 2^64) (same seed, same
        motion, on every backend).
    steps (1..1000), temperature (0..10), cfg (0..20), history ("masked" | "feedback"):
        sampling settings; None takes the manifest's defaults.
    context_turns: past turns kept visible, 0..W-1 (None: all W-1), for context experiments.
    smoothing: the output's causal smoothing (timar_sdk.runtime.smoothing): None or True for the
        bundle's defaults (its manifest's "smoothing"; none if it has none), False for the exact
        model output, or a dict of time constants in seconds per region, e.g.
        {"jaw": 0.03, "expression": 0.1, "neck": 0.2} (a region left out is not smoothed).
    Raises TimarInputError naming the argument, or BundleError naming the bundle file.
    """

    def __init__(self, model: Model | str | os.PathLike | Bundle | None = None, backend: str | None = None,
                 seed: int = 0, steps: int | None = None, temperature: float | None = None,
                 cfg: float | None = None, history: str | None = None, threads: int | None = None,
                 context_turns: int | None = None, smoothing: bool | dict | None = None):
        t0 = time.perf_counter()
        if isinstance(model, Model):
            for name, value in (("backend", backend), ("threads", threads)):
                if value is not None:
                    raise TimarInputError(f"{name}: set it on the Model (Model(bundle, {name}=...)), not on a "
                                          f"Session that shares one; got {value!r}")
            self.model = model
        elif model is not None and not isinstance(model, (str, os.PathLike, Bundle)):
            raise TimarInputError(f"model: expected a Model, a bundle folder (str or path), a Bundle or None, "
                                  f"got {model!r}")
        self.seed = check_integer("seed", seed, 0, 2**64 - 1)
        if not isinstance(model, Model):
            self.model = Model(model, "auto" if backend is None else backend, threads)
        m = self.bundle.manifest
        defaults, w = m["sampling"], m["context_turns"]
        self.steps = check_integer("steps", defaults["steps"] if steps is None else steps,
                                   1, m["diffusion"]["num_train_steps"])
        self.temperature = _real("temperature", defaults["temperature"] if temperature is None else temperature,
                                 *TEMPERATURE_RANGE)
        self.cfg = _real("cfg", defaults["cfg"] if cfg is None else cfg, *CFG_RANGE)
        self.history = m["history"] if history is None else history
        if self.history not in ("masked", "feedback"):
            raise TimarInputError(f"history: expected 'masked' or 'feedback', got {history!r}")
        if self.window and self.history != "masked":
            raise TimarInputError("history: window_recompute bundles (the authors' models) support only "
                                  "'masked' (their --mask_history_agent)")
        self.context_turns = None if context_turns is None else check_integer("context_turns", context_turns, 0, w - 1)
        if smoothing is None or smoothing is True:
            self.smoothing = check_smoothing(m.get("smoothing", False), "bundle: manifest.json: smoothing")
        else:
            self.smoothing = check_smoothing(smoothing)
        self._smoothing_a = filter_coefficients(self.smoothing, m["fps"])
        self.schedule = respaced_schedule(self.bundle.alphas_cumprod, self.steps)
        self.frames = self.model.frames
        self.samples = self.model.samples
        self.rows = 1 if self.cfg == 1.0 else 2
        self.reset()
        self.start_seconds = time.perf_counter() - t0

    @property
    def bundle(self) -> Bundle:
        return self.model.bundle

    @property
    def backend(self):
        return self.model.backend

    @property
    def window(self) -> bool:
        return self.model.window

    # ---- public API ------------------------------------------------------------------------
    @property
    def info(self) -> dict:
        """The model's facts (`Model.info`) and this session's settings and state."""
        return {**self.model.info, "history": self.history, "seed": self.seed, "steps": self.steps,
                "temperature": self.temperature, "cfg": self.cfg, "smoothing": dict(self.smoothing),
                "state_bytes": self.state_bytes,
                "turns": self.turns}

    @property
    def turns(self) -> int:
        """Turns committed since the last reset."""
        return self._conv.turns

    @property
    def state_bytes(self) -> int:
        """Memory of this conversation's model state: the KV cache (cached bundles:
        layers x 2 x rows x heads x (W-1)*110 x head_dim values of the bundle's cache dtype: float32,
        or float16 in a half-size-cache bundle) or the token window and audio statistics
        (window_recompute bundles, at most W-1 turns of 110 tokens)."""
        if self.window:
            return sum(t.nbytes for t in self._conv.tokens)
        values = int(np.prod(self.backend.cache_shape[:2])) * self.rows * int(np.prod(self.backend.cache_shape[3:]))
        return values * np.dtype(getattr(self.backend, "cache_dtype", self.bundle.cache_dtype)).itemsize

    def reset(self) -> None:
        """Back to a fresh session: empty cache and buffers, generator at its seed."""
        m = self.bundle.manifest
        ring = TurnRing.empty(m["context_turns"], m["turn_layout"]["tokens_per_turn"], self.context_turns)
        norms = ()
        if self.window:
            eps = float(m["audio_normalization"].get("eps", 1e-7))
            norms = (RunningNorm(eps=eps), RunningNorm(eps=eps))   # user, agent
        else:
            self._cache = self.backend.new_cache(self.rows)
        self._conv = Conversation(ring, PhiloxNormal(self.seed).get_state(), audio_norm=norms)

    def prime_audio_normalization(self, user_audio=None, agent_audio=None) -> None:
        """Start the audio normalisation of a window_recompute bundle (the authors' models) from
        known statistics instead of from nothing: the first turns are then normalised close to the
        authors' whole-file normalisation (docs/AUTHORS_CHECKPOINT.md measures it).

        Each argument is, for that speaker, a calibration clip (a 1-D float32/float64 array in
        [-1, 1] or int16 at the bundle's rate, e.g. a few seconds through the same microphone and
        gain) or a `timar_sdk.audio.RunningNorm` (e.g. `RunningNorm.from_stats(mean, var, count)`);
        None leaves that speaker's statistics as they are. The given statistics replace those
        heard so far; every later turn adds to them. Part of get_state(); reset() clears them.
        Raises TimarInputError naming the argument for a cached bundle (the SDK's models do not
        normalise audio) or bad input; nothing changes then.
        """
        if not self.window:
            given = "user_audio" if user_audio is not None else "agent_audio"
            raise TimarInputError(f"{given}: prime_audio_normalization is for window_recompute bundles (the "
                                  f"authors' models); this bundle's attention is "
                                  f"{self.bundle.manifest['attention']!r} and does not normalise audio")
        norms = list(self._conv.audio_norm)
        for i, (name, value) in enumerate((("user_audio", user_audio), ("agent_audio", agent_audio))):
            if value is None:
                continue
            eps = norms[i].eps
            if isinstance(value, RunningNorm):
                try:
                    value.check()
                except ValueError as e:
                    raise TimarInputError(f"{name}: {e}") from None
                norms[i] = replace(value, eps=eps)      # the bundle's eps
            else:
                norms[i] = RunningNorm(eps=eps).update(self._audio(value, name))
        self._conv = replace(self._conv, audio_norm=tuple(norms))

    def step(self, user_audio, user_motion, agent_audio) -> np.ndarray:
        """Exactly one turn. Audio: [samples_per_turn] float32/float64 in [-1, 1] or int16 at the
        bundle's rate; user_motion: [frames_per_turn, 56] raw FLAME values, or None when the
        user's face is not tracked. Returns the agent's motion float32 [frames_per_turn, 56].
        Ignores (and keeps) what feed() has buffered."""
        result = step_many([(self, user_audio, user_motion, agent_audio)])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def feed(self, user_audio=None, user_motion=None, agent_audio=None) -> np.ndarray:
        """Pieces of any length (a 20 ms audio callback, a few motion frames); returns the frames
        of every turn this call completed, float32 [k * frames_per_turn, 56] (k may be 0).

        A turn completes when both audio streams hold a whole turn and, once any user motion has
        been fed since the last reset, the user motion holds a whole turn too. Never feed user
        motion for a user whose face is not tracked: those turns use the "absent" embedding.
        """
        conv = self._buffered(self._conv, user_audio, user_motion, agent_audio)
        motion, conv = self._run_turns(conv, _ready(conv, self.samples, self.frames))
        self._conv = conv
        return motion

    def accept(self, user_audio=None, user_motion=None, agent_audio=None) -> int:
        """Buffer pieces of input without running the model (input checks and a copy, well under
        a millisecond): the cheap half of feed(), for an audio callback; returns `ready_turns`.
        Bad input raises TimarInputError and buffers nothing."""
        self._conv = self._buffered(self._conv, user_audio, user_motion, agent_audio)
        return self.ready_turns

    @property
    def ready_turns(self) -> int:
        """Whole turns buffered and ready to run (see feed())."""
        return _ready(self._conv, self.samples, self.frames)

    def _buffered(self, conv: Conversation, user_audio, user_motion, agent_audio) -> Conversation:
        """conv with the checked pieces appended to its buffers."""
        ua, aa, um = conv.buffers
        last = conv.last_motion
        if user_audio is not None:
            ua = np.concatenate([ua, self._audio(user_audio, "user_audio")])
        if agent_audio is not None:
            aa = np.concatenate([aa, self._audio(agent_audio, "agent_audio")])
        if user_motion is not None:
            fed = self._motion(user_motion, "user_motion")
            um, last = np.concatenate([um, fed]), fed[-1].copy()
        return replace(conv, buffers=(ua, aa, um), motion_tracked=conv.motion_tracked or user_motion is not None,
                       last_motion=last)

    def flush(self) -> np.ndarray:
        """Finish the conversation's buffered audio: run every buffered turn, the last one padded
        with silence, and return the frames the real audio covers, float32 [n, 56] with
        n = floor(samples * fps / sample_rate) of the shorter audio stream (the longer stream's
        extra samples are dropped). A tracked user's motion that lags behind the audio is padded
        with the last frame fed. Afterwards the buffers are empty."""
        conv = self._conv
        ua, aa, um = conv.buffers
        real = min(len(ua), len(aa))
        n_frames = real * self.frames // self.samples
        if n_frames == 0:
            self._conv = replace(conv, buffers=EMPTY_BUFFERS)
            return np.zeros((0, MOTION_DIM), np.float32)
        turns = -(-real // self.samples)
        pad = lambda a: np.pad(a[:real], (0, turns * self.samples - real))  # noqa: E731
        if conv.motion_tracked:
            need = turns * self.frames - len(um)
            if need > 0:
                um = np.concatenate([um, np.repeat(conv.last_motion[None], need, axis=0)])
        motion, conv = self._run_turns(replace(conv, buffers=(pad(ua), pad(aa), um)), turns)
        self._conv = replace(conv, buffers=EMPTY_BUFFERS)
        return motion[:n_frames]

    def get_state(self, include_buffers: bool = True) -> dict:
        """A snapshot to fork or restore later: the bundle id, the settings, the cache (cached
        bundles, `state_bytes` of the cache dtype) or token window and audio statistics, the ring ages,
        the generator counter, and (include_buffers) the audio and motion not yet in a turn."""
        c = self._conv
        state = {"bundle": self.bundle.id, "settings": self._settings(), "rows": self.rows,
                 "slot_age": list(c.ring.slot_age), "noise": dict(c.noise), "turns": c.turns,
                 "smoothed": None if c.smoothed is None else c.smoothed.copy()}
        if self.window:
            state["tokens"] = [t.copy() for t in c.tokens]
            state["audio_norm"] = [n.to_list() for n in c.audio_norm]
        else:
            state["cache"] = self.backend.cache_to_numpy(self._cache)
        if include_buffers:
            state["buffers"] = {"user_audio": c.user_audio.copy(), "agent_audio": c.agent_audio.copy(),
                                "user_motion": c.user_motion.copy()}
            state["motion_tracked"] = c.motion_tracked
            state["last_motion"] = None if c.last_motion is None else c.last_motion.copy()
        return state

    def set_state(self, state: dict, include_buffers: bool = True) -> None:
        """Restore a snapshot taken by get_state on a session of the same bundle and settings.
        Everything is checked before anything changes: a refused snapshot leaves the session as
        it was."""
        conv, cache = self._check_state(state, include_buffers)
        if cache is not None:
            self._cache = self.backend.cache_from_numpy(cache)
        self._conv = conv

    # ---- the turn ------------------------------------------------------------------------------
    def _run_turns(self, conv: Conversation, turns: int) -> tuple[np.ndarray, Conversation]:
        """Run `turns` whole turns from the front of conv's buffers. Returns their motion and the
        conversation after them; on any exception (interrupts included) the cache is put back,
        so the caller, which commits by assigning the result, leaves the session as it was."""
        s, f, out = self.samples, self.frames, []
        # A single turn fails before it writes the cache; two or more need a copy to roll back.
        saved = self.backend.cache_to_numpy(self._cache) if turns >= 2 and not self.window else None
        try:
            for _ in range(turns):
                ua, aa, um = conv.buffers
                motion, conv, write = self._turn(conv, ua[:s], um[:f] if conv.motion_tracked else None, aa[:s])
                write()
                out.append(motion)
                conv = replace(conv, buffers=(ua[s:], aa[s:], um[f:] if conv.motion_tracked else um))
        except BaseException:
            if saved is not None:
                self._cache = self.backend.cache_from_numpy(saved)
            raise
        return (np.concatenate(out) if out else np.zeros((0, MOTION_DIM), np.float32)), conv

    def _turn(self, conv: Conversation, ua: np.ndarray, um: np.ndarray | None, aa: np.ndarray):
        """Run one turn without changing the session. Returns (motion [F, 56], the conversation
        after the turn, write): `write()` puts the turn's keys/values into the cache."""
        result = _run_turns_together([_Turn(self, conv, ua, um, aa)])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    # ---- checks --------------------------------------------------------------------------------
    def _settings(self) -> dict:
        return {k: getattr(self, k) for k in SETTINGS}

    def _audio(self, audio, name: str, exact: bool = False) -> np.ndarray:
        a = to_float32(audio, name)
        if exact and len(a) != self.samples:
            raise TimarInputError(f"{name}: expected {self.samples} samples (one turn at "
                                  f"{self.bundle['sample_rate']} Hz), got {len(a)}; use feed() for other lengths")
        return a

    def _motion(self, motion, name: str, exact: bool = False) -> np.ndarray:
        m = np.asarray(motion)
        if m.ndim != 2 or m.shape[1] != MOTION_DIM or not np.issubdtype(m.dtype, np.floating):
            raise TimarInputError(f"{name}: expected a float array of shape (frames, {MOTION_DIM}), "
                                  f"got {m.dtype} {m.shape}")
        if exact and m.shape[0] != self.frames:
            raise TimarInputError(f"{name}: expected {self.frames} frames (one turn), got {m.shape[0]}")
        if m.shape[0] == 0:
            raise TimarInputError(f"{name}: empty array")
        with np.errstate(over="ignore"):     # float64 beyond float32 becomes Inf, refused below
            m = m.astype(np.float32)
        if not np.isfinite(m).all():
            raise TimarInputError(f"{name}: contains NaN or Inf (or values beyond float32)")
        peak = float(np.abs(m).max())
        if peak > MOTION_LIMIT:
            raise TimarInputError(f"{name}: expected FLAME values within +-{MOTION_LIMIT:g} (expression "
                                  f"coefficients and radians), got a value of magnitude {peak:.4g}")
        return m

    def _check_state(self, state, include_buffers: bool) -> tuple[Conversation, np.ndarray | None]:
        """The Conversation (and cache) a snapshot describes, every part checked."""
        def bad(what: str):
            return TimarInputError(f"state: {what}")

        if not isinstance(state, dict) or state.get("bundle") != self.bundle.id:
            raise bad("expected a get_state() snapshot of a session on this bundle")
        need = ["settings", "slot_age", "noise", "turns", "smoothed"] + (["tokens", "audio_norm"] if self.window else ["cache"])
        if include_buffers:
            need += ["buffers", "motion_tracked", "last_motion"]
        missing = [k for k in need if k not in state]
        if missing:
            raise bad(f"missing {missing}; expected a get_state() snapshot")
        settings = state["settings"] if isinstance(state["settings"], dict) else {}
        for key, value in self._settings().items():
            if settings.get(key, object()) != value:
                raise bad(f"taken with {key}={settings.get(key)!r}, this session has {key}={value!r}; "
                          f"restore it into a session made with the same settings")
        turns = state["turns"]
        if isinstance(turns, bool) or not isinstance(turns, (int, np.integer)) or turns < 0:
            raise bad(f"turns: expected an integer >= 0, got {turns!r}")
        ring = TurnRing.empty(self._conv.ring.context_turns, self._conv.ring.tokens_per_turn, self.context_turns)
        for _ in range(_ring_steps(int(turns), ring.slots)):
            ring = ring.advance()
        if list(state["slot_age"]) != list(ring.slot_age):
            raise bad(f"slot_age {list(state['slot_age'])} is not the ring of a session after {turns} turns "
                      f"(expected {list(ring.slot_age)})")
        noise = state["noise"]
        try:
            PhiloxNormal(self.seed).set_state(noise)
        except (KeyError, TypeError, ValueError) as e:
            raise bad(f"noise: expected the generator state {{'seed', 'counter'}}, got {noise!r} ({e})") from None
        if noise["seed"] != self.seed:
            raise bad(f"noise: generator seed {noise['seed']} differs from this session's seed {self.seed}")
        blocks = -(-(self.steps + 1) * self.frames * MOTION_DIM // 4)     # one noise request per turn
        if noise["counter"] != turns * blocks:
            raise bad(f"noise: generator counter {noise['counter']} is not that of {turns} turns "
                      f"({turns} x {blocks} blocks)")
        smoothed = state["smoothed"]
        if self._smoothing_a is None or turns == 0:
            if smoothed is not None:
                raise bad("smoothed: expected None (smoothing is off, or no turn yet)")
        else:
            smoothed = _finite_array(smoothed, (MOTION_DIM,), "smoothed")
        cache, tokens, norms = None, (), ()
        if self.window:
            p, d = self.bundle["window"]["tokens_per_turn"], self.bundle["window"]["token_dim"]
            tokens = tuple(_finite_array(t, (p, d), "tokens") for t in state["tokens"])
            if len(tokens) != min(int(turns), ring.slots):
                raise bad(f"tokens: expected {min(int(turns), ring.slots)} turns of tokens, got {len(tokens)}")
            eps = self._conv.audio_norm[0].eps
            try:
                norms = tuple(RunningNorm.from_list(v, eps) for v in state["audio_norm"])
            except (TypeError, ValueError) as e:
                raise bad(f"audio_norm: expected two [count, sum, sum of squares] lists ({e})") from None
            if len(norms) != 2 or not all(n.count >= 0 and n.total_sq >= 0 and math.isfinite(n.total)
                                          and math.isfinite(n.total_sq) for n in norms):
                raise bad("audio_norm: expected two finite [count >= 0, sum, sum of squares >= 0] lists")
        else:
            shape = list(self.backend.cache_shape)
            shape[2] = self.rows
            cache = _finite_array(state["cache"], tuple(shape), "cache")
        conv = Conversation(ring, {"seed": int(noise["seed"]), "counter": int(noise["counter"])}, int(turns),
                            tokens, norms, self._conv.buffers, self._conv.motion_tracked, self._conv.last_motion,
                            smoothed)
        if include_buffers:
            buffers = state["buffers"]
            if not isinstance(buffers, dict) or set(buffers) != {"user_audio", "agent_audio", "user_motion"}:
                raise bad("buffers: expected {'user_audio', 'agent_audio', 'user_motion'}")
            audio = [self._audio(buffers[k], f"state: buffers.{k}") if len(buffers[k]) else np.zeros(0, np.float32)
                     for k in ("user_audio", "agent_audio")]
            motion = buffers["user_motion"]
            motion = self._motion(motion, "state: buffers.user_motion") if len(motion) else np.zeros((0, MOTION_DIM), np.float32)
            last = state["last_motion"]
            if last is not None:
                last = self._motion(np.asarray(last).reshape(1, -1), "state: last_motion")[0]
            if not isinstance(state["motion_tracked"], (bool, np.bool_)) or (state["motion_tracked"] and last is None
                                                                              and len(motion) == 0):
                raise bad("motion_tracked: expected a bool (True only once user motion was fed)")
            conv = replace(conv, buffers=(audio[0], audio[1], motion), motion_tracked=bool(state["motion_tracked"]),
                           last_motion=last if last is not None or not len(motion) else motion[-1].copy())
        return conv, cache


def _real(name: str, value, lo: float, hi: float) -> float:
    if (isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating))
            or not (math.isfinite(value) and lo <= value <= hi)):
        raise TimarInputError(f"{name}: expected a finite number in {lo:g}..{hi:g}, got {value!r}")
    return float(value)


def _ring_steps(turns: int, slots: int) -> int:
    """Advances from an empty ring that give the ring of `turns` turns: once full it repeats
    every `slots` turns."""
    if slots == 0 or turns <= slots:
        return turns
    return slots + (turns - slots) % slots


def _finite_array(value, shape: tuple, name: str) -> np.ndarray:
    a = np.asarray(value)
    if a.shape != shape or not np.issubdtype(a.dtype, np.floating):
        raise TimarInputError(f"state: {name}: expected a float array of shape {list(shape)}, got {a.dtype} "
                              f"{list(a.shape)} (another bundle or cfg setting?)")
    a = np.array(a, np.float32, copy=True)
    if not np.isfinite(a).all():
        raise TimarInputError(f"state: {name}: contains NaN or Inf")
    return a



# ---- turns of several sessions in one batch -------------------------------------------------------
def step_many(turns) -> list:
    """`Session.step` for several sessions of one Model at once: each graph runs once for all of
    them (rows = sessions x CFG rows), and every session gets the motion it would get alone.

    turns: (session, user_audio, user_motion, agent_audio) per session, as for `Session.step`;
        each session at most once.
    Returns, per session in order, its motion float32 [frames_per_turn, 56], or the exception
    its `step` would have raised (then that session alone is unchanged).
    """
    turns = list(turns)
    sessions = [t[0] for t in turns]
    if not all(isinstance(s, Session) for s in sessions) or len({id(s) for s in sessions}) != len(sessions):
        raise TimarInputError("turns: expected (session, user_audio, user_motion, agent_audio) tuples, each "
                              "session at most once")
    if len({id(s.model) for s in sessions}) > 1:
        raise TimarInputError("turns: expected sessions of one Model (batching runs that model's graphs once)")
    results: list = [None] * len(turns)
    ready = []
    for i, (s, ua, um, aa) in enumerate(turns):
        try:
            ready.append((i, _Turn(s, s._conv, s._audio(ua, "user_audio", exact=True),
                                   None if um is None else s._motion(um, "user_motion", exact=True),
                                   s._audio(aa, "agent_audio", exact=True))))
        except TimarInputError as e:
            results[i] = e
    for i, outcome in zip([i for i, _ in ready], _run_turns_together([t for _, t in ready])):
        if isinstance(outcome, BaseException):
            results[i] = outcome
            continue
        motion, conv, write = outcome
        session = turns[i][0]
        write()
        session._conv = conv
        results[i] = motion
    return results


@dataclass
class _Turn:
    """One session's turn inside a batch: its inputs, checked."""
    session: "Session"
    conv: Conversation
    ua: np.ndarray
    um: np.ndarray | None
    aa: np.ndarray


def _run_turns_together(turns: list[_Turn]) -> list:
    """Run turns of sessions of one Model, none of them committed, in as few graph calls as
    possible: turns that share a number of sampling steps, a history mode and (window bundles) a
    window length run as one batch. Returns per turn (motion, conversation after, write) or the
    exception that turn raised."""
    groups: dict = {}
    for k, t in enumerate(turns):
        s = t.session
        n_past = _visible_past(t.conv) if s.window else 0
        # The cache goes in as one batched tensor: host caches can be stacked, device caches not.
        stackable = s.window or isinstance(s._cache, np.ndarray)
        groups.setdefault((s.steps, s.history, n_past, -1 if stackable else k), []).append(k)
    results: list = [None] * len(turns)
    for members in groups.values():
        try:
            outcomes = _run_group([turns[k] for k in members])
        except Exception as e:  # noqa: BLE001 - a backend failure fails the turns of its batch
            outcomes = [e] * len(members)
        for k, outcome in zip(members, outcomes):
            results[k] = outcome
    return results


def _ready(conv: Conversation, samples: int, frames: int) -> int:
    """Whole turns in conv's buffers: both audio streams, and the user motion once tracked."""
    ua, aa, um = conv.buffers
    ready = min(len(ua), len(aa)) // samples
    return min(ready, len(um) // frames) if conv.motion_tracked else ready


def _visible_past(conv: Conversation) -> int:
    visible = conv.ring.visible_turns                       # context experiment: fewer past turns
    return len(conv.tokens) if visible is None else min(visible, len(conv.tokens))


def _run_group(turns: list[_Turn]) -> list:
    """Turns with the same steps, history and window length: each graph once for all of them."""
    first = turns[0].session
    model, backend, f = first.model, first.backend, first.frames
    rows = [t.session.rows for t in turns]
    offsets = np.cumsum([0] + rows)
    rep = lambda a, r: np.repeat(a[None], r, axis=0)  # noqa: E731
    cat = lambda parts: parts[0] if len(parts) == 1 else np.concatenate(parts)  # noqa: E731
    # A user whose face is not tracked reads as the neutral face (all-zero FLAME parameters);
    # the SDK's models also get the "absent" flag, which replaces those tokens.
    user_motion = [(((np.zeros((f, MOTION_DIM), np.float32) if t.um is None else t.um) - model.motion_mean)
                    / model.motion_std).astype(np.float32) for t in turns]
    uncond = [np.array([0.0, 1.0][:r], np.float32) for r in rows]
    if first.window:
        norms = [(t.conv.audio_norm[0].update(t.ua), t.conv.audio_norm[1].update(t.aa)) for t in turns]
        waves = [w for t, n in zip(turns, norms) for w in (n[0].apply(t.ua), n[1].apply(t.aa))]
    else:
        waves = [w for t in turns for w in (t.ua, t.aa)]
    feats = backend.encode_audio(np.stack(waves))          # [2N, F, Da]: user, agent per turn
    if first.window:
        tokens_in = {"user_speech": cat([rep(feats[2 * i], r) for i, r in enumerate(rows)]),
                     "agent_speech": cat([rep(feats[2 * i + 1], r) for i, r in enumerate(rows)]),
                     "user_motion": cat([rep(m, r) for m, r in zip(user_motion, rows)]), "uncond": cat(uncond)}
        turn_tokens = backend.embed_turn(tokens_in)         # [B, P, D]
        n_past = _visible_past(turns[0].conv)
        windows = []
        for t, r, o in zip(turns, rows, offsets):
            own = turn_tokens[o:o + r]
            if n_past:                                      # past turns (conditional row) + this turn
                past = np.concatenate(t.conv.tokens[len(t.conv.tokens) - n_past:])
                own = np.concatenate([rep(past, r), own], axis=1)
            windows.append(own)
        z = backend.encode_window(cat(windows))
    else:
        inputs = {"user_speech": cat([rep(feats[2 * i], r) for i, r in enumerate(rows)]),
                  "user_motion": cat([rep(m, r) for m, r in zip(user_motion, rows)]),
                  "agent_speech": cat([rep(feats[2 * i + 1], r) for i, r in enumerate(rows)]),
                  "agent_motion": np.zeros((offsets[-1], f, MOTION_DIM), np.float32),
                  "agent_mask": np.ones((offsets[-1], f), np.float32), "uncond": cat(uncond),
                  "user_motion_absent": cat([np.full(r, 1.0 if t.um is None else 0.0, np.float32)
                                             for t, r in zip(turns, rows)]),
                  "past_turn_age": cat([t.conv.ring.token_ages(r) for t, r in zip(turns, rows)])}
        cache = first._cache if len(turns) == 1 else backend.stack_caches([t.session._cache for t in turns])
        z, present = backend.encoder_step(inputs, cache)
    noises = []
    for t in turns:
        noise = PhiloxNormal(t.session.seed)
        noise.set_state(t.conv.noise)
        noises.append(noise)
    zs = [z[o:o + r].reshape(-1, z.shape[-1]) for o, r in zip(offsets, rows)]
    xs = sample_turns(backend.denoise, zs, noises, first.schedule, [t.session.temperature for t in turns],
                      [t.session.cfg for t in turns])
    if first.history == "feedback":
        inputs.update(agent_motion=cat([rep(x, r) for x, r in zip(xs, rows)]),
                      agent_mask=np.zeros((offsets[-1], f), np.float32), uncond=np.zeros(offsets[-1], np.float32))
        _, present = backend.encoder_step(inputs, cache)

    results = []
    for i, (t, x, o, r) in enumerate(zip(turns, xs, offsets, rows)):
        motion = (x * model.motion_std + model.motion_mean).astype(np.float32)
        checked = [motion, zs[i]]                            # what the turn adds must be finite
        tokens, turn_norms, turn_present = t.conv.tokens, t.conv.audio_norm, None
        if first.window:
            keep = first.bundle["context_turns"] - 1
            tokens = (tokens + (turn_tokens[o],))[-keep:] if keep else ()
            turn_norms = norms[i]
            checked.append(turn_tokens[o])
        else:
            turn_present = present[:, :, o:o + r] if len(turns) > 1 else present
            if isinstance(turn_present, np.ndarray):          # device caches: z stands for them
                checked.append(turn_present)
        if not all(np.isfinite(a).all() for a in checked):
            results.append(TimarRuntimeError(
                f"turn {t.conv.turns}: the model produced NaN or Inf from finite, in-range input; the session "
                f"is unchanged (is the bundle's model sound?)"))
            continue
        motion, smoothed = smooth(motion, t.conv.smoothed, t.session._smoothing_a)
        after = replace(t.conv, ring=t.conv.ring.advance(), noise=noises[i].get_state(), turns=t.conv.turns + 1,
                        tokens=tokens, audio_norm=turn_norms, smoothed=smoothed)
        results.append((motion, after, _writer(t.session, turn_present, -1 if first.window else t.conv.ring.next_slot())))
    return results


def _writer(session: "Session", present, slot: int):
    """A function that puts a turn's keys/values into the session's cache slot."""
    def write() -> None:
        if slot >= 0:
            session._cache = session.backend.commit(session._cache, present, slot)
    return write
