"""`Session`: stream a conversation turn by turn through a bundle (DESIGN.md section 4).

    session = timar_sdk.Session()                  # the shipped default bundle, best backend
    motion = session.step(user_audio, user_motion, agent_audio)   # one turn -> [25, 56]
    frames = session.feed(user_audio=chunk, agent_audio=chunk)    # any-size pieces -> [k*25, 56]

Nothing in the session changes until a whole turn has succeeded: a bad input or a backend error
leaves it exactly as it was.
"""
from __future__ import annotations

import time

import numpy as np

from timar_sdk.audio import RunningNorm, to_float32
from timar_sdk.layout import MOTION_DIM, MOTION_NAMES
from timar_sdk.runtime.backends import make_backend
from timar_sdk.runtime.bundle import Bundle, BundleError
from timar_sdk.runtime.ring import TurnRing
from timar_sdk.runtime.rng import PhiloxNormal
from timar_sdk.sampler import respaced_schedule, sample_turn


class TimarInputError(ValueError):
    """A bad argument to a Session call; the message names the argument and what was expected."""


class Session:
    """A streaming TIMAR session over a bundle.

    bundle: a bundle folder (None: the default bundle shipped in the package).
    backend: "auto" | "onnxruntime" | "tensorrt" | "torch".
    seed: seed of the portable Philox generator (same seed, same motion, on every backend).
    steps, temperature, cfg, history: sampling settings; None takes the manifest's defaults.
    threads: intra-op threads of the backend (None: the backend's default).
    context_turns: past turns kept visible, 0..W-1 (None: all W-1), for context experiments.
    """

    def __init__(self, bundle=None, backend: str = "auto", seed: int = 0, steps: int | None = None,
                 temperature: float | None = None, cfg: float | None = None, history: str | None = None,
                 threads: int | None = None, context_turns: int | None = None):
        t0 = time.perf_counter()
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
        m = self.bundle.manifest
        if m["generator"]["name"] != PhiloxNormal.NAME:
            raise BundleError(f"manifest.json: generator {m['generator']['name']!r} is not implemented "
                              f"here (this runtime has {PhiloxNormal.NAME!r})")
        # "cached": past turns live as keys/values (the SDK's models). "window_recompute": past
        # turns live as token embeddings and the whole window runs each turn (the authors' models).
        self.window = m["attention"] == "window_recompute"
        if self.window and m["audio_normalization"]["mode"] != "running":
            raise BundleError(f"manifest.json: audio_normalization {m['audio_normalization']['mode']!r} is not "
                              f"implemented for window_recompute bundles (this runtime has 'running')")
        defaults = m["sampling"]
        self.steps = int(defaults["steps"] if steps is None else steps)
        self.temperature = float(defaults["temperature"] if temperature is None else temperature)
        self.cfg = float(defaults["cfg"] if cfg is None else cfg)
        self.history = m["history"] if history is None else history
        if self.history not in ("masked", "feedback"):
            raise TimarInputError(f"history: expected 'masked' or 'feedback', got {history!r}")
        if self.window and self.history != "masked":
            raise TimarInputError("history: window_recompute bundles (the authors' models) support only "
                                  "'masked' (their --mask_history_agent)")
        if not self.temperature >= 0:
            raise TimarInputError(f"temperature: expected a number >= 0, got {temperature!r}")
        if not np.isfinite(self.cfg):
            raise TimarInputError(f"cfg: expected a finite number, got {cfg!r}")
        self.schedule = respaced_schedule(self.bundle.alphas_cumprod, self.steps)
        self.seed = seed
        self.frames = m["frames_per_turn"]
        self.samples = m["samples_per_turn"]
        self.rows = 1 if self.cfg == 1.0 else 2
        self._mean, self._std = self.bundle.motion_mean, self.bundle.motion_std
        self._context = context_turns
        self.backend = make_backend(backend, self.bundle, threads)
        self.reset()
        self.start_seconds = time.perf_counter() - t0

    # ---- public API ------------------------------------------------------------------------
    @property
    def info(self) -> dict:
        m = self.bundle.manifest
        return {"fps": m["fps"], "frames_per_turn": self.frames, "sample_rate": m["sample_rate"],
                "samples_per_turn": self.samples, "motion_dim": MOTION_DIM,
                "motion_names": list(MOTION_NAMES), "motion_layout": {k: m["motion_layout"][k] for k in ("exp", "jaw", "neck")},
                "context_turns": m["context_turns"], "history": self.history, "steps": self.steps,
                "temperature": self.temperature, "cfg": self.cfg, "attention": m["attention"],
                "backend": self.backend.name,
                "providers": list(self.backend.providers), "model_preset": m["model"]["preset"],
                "turns": self.turns}

    def reset(self) -> None:
        """Back to a fresh session: empty cache and buffers, generator at its seed."""
        m = self.bundle.manifest
        self._ring = TurnRing.empty(m["context_turns"], m["turn_layout"]["tokens_per_turn"], self._context)
        if self.window:
            self._tokens: tuple[np.ndarray, ...] = ()      # past turns' tokens [P, D], oldest first
            eps = float(m["audio_normalization"].get("eps", 1e-7))
            self._audio_norm = (RunningNorm(eps=eps), RunningNorm(eps=eps))   # user, agent
        else:
            self._cache = self.backend.new_cache(self.rows)
        self._noise = PhiloxNormal(self.seed)
        self._buf = {"user_audio": np.zeros(0, np.float32), "agent_audio": np.zeros(0, np.float32),
                     "user_motion": np.zeros((0, MOTION_DIM), np.float32)}
        self._motion_tracked = False
        self.turns = 0

    def step(self, user_audio, user_motion, agent_audio) -> np.ndarray:
        """Exactly one turn. Audio: [samples_per_turn] float32/int16 at the bundle's rate;
        user_motion: [frames_per_turn, 56] raw FLAME values, or None when the user's face is not
        tracked. Returns the agent's motion float32 [frames_per_turn, 56]."""
        ua = self._audio(user_audio, "user_audio", exact=True)
        aa = self._audio(agent_audio, "agent_audio", exact=True)
        um = None if user_motion is None else self._motion(user_motion, "user_motion", exact=True)
        motion, commit = self._turn(ua, um, aa)
        commit()
        return motion

    def feed(self, user_audio=None, user_motion=None, agent_audio=None) -> np.ndarray:
        """Pieces of any length (a 20 ms audio callback, a few motion frames); returns the frames
        of every turn this call completed, float32 [k * frames_per_turn, 56] (k may be 0).

        A turn completes when both audio streams hold a whole turn and, once any user motion has
        been fed since the last reset, the user motion holds a whole turn too. Never feed user
        motion for a user whose face is not tracked: those turns use the "absent" embedding.
        """
        buf = dict(self._buf)
        if user_audio is not None:
            buf["user_audio"] = np.concatenate([buf["user_audio"], self._audio(user_audio, "user_audio")])
        if agent_audio is not None:
            buf["agent_audio"] = np.concatenate([buf["agent_audio"], self._audio(agent_audio, "agent_audio")])
        tracked = self._motion_tracked or user_motion is not None
        if user_motion is not None:
            buf["user_motion"] = np.concatenate([buf["user_motion"], self._motion(user_motion, "user_motion")])

        ready = min(len(buf["user_audio"]) // self.samples, len(buf["agent_audio"]) // self.samples)
        if tracked:
            ready = min(ready, len(buf["user_motion"]) // self.frames)

        out = []
        # Commit turn by turn, but roll all of them back if a later one fails. A single turn
        # fails before its commit, so the snapshot (a copy of the cache) is needed only for two
        # or more: a 20 ms audio callback never pays for it.
        saved = self.get_state(include_buffers=False) if ready >= 2 else None
        try:
            for _ in range(ready):
                um = buf["user_motion"][:self.frames] if tracked else None
                motion, commit = self._turn(buf["user_audio"][:self.samples], um, buf["agent_audio"][:self.samples])
                commit()
                out.append(motion)
                buf = {"user_audio": buf["user_audio"][self.samples:], "agent_audio": buf["agent_audio"][self.samples:],
                       "user_motion": buf["user_motion"][self.frames:] if tracked else buf["user_motion"]}
        except Exception:
            if saved is not None:
                self.set_state(saved, include_buffers=False)
            raise
        self._buf, self._motion_tracked = buf, tracked
        return np.concatenate(out) if out else np.zeros((0, MOTION_DIM), np.float32)

    def flush(self) -> np.ndarray:
        """Finish a trailing partial turn: pad audio with silence (and user motion with its last
        frame), run it, and return only the frames the real audio covers."""
        real = min(len(self._buf["user_audio"]), len(self._buf["agent_audio"]))
        n_frames = real * self.frames // self.samples
        if n_frames == 0:
            self._buf = {k: v[:0] for k, v in self._buf.items()}
            return np.zeros((0, MOTION_DIM), np.float32)
        pad = lambda a: np.pad(a[:self.samples], (0, max(0, self.samples - len(a))))  # noqa: E731
        um = None
        if self._motion_tracked and len(self._buf["user_motion"]):
            have = self._buf["user_motion"][:self.frames]
            um = np.concatenate([have, np.repeat(have[-1:], self.frames - len(have), 0)])
        motion, commit = self._turn(pad(self._buf["user_audio"]), um, pad(self._buf["agent_audio"]))
        commit()
        self._buf = {k: v[:0] for k, v in self._buf.items()}
        return motion[:n_frames]

    def get_state(self, include_buffers: bool = True) -> dict:
        """A snapshot (cache or token window, ring ages, generator counter, buffers) to fork or
        restore later."""
        state = {"bundle": self.bundle.id, "rows": self.rows, "slot_age": list(self._ring.slot_age),
                 "noise": self._noise.get_state(), "turns": self.turns}
        if self.window:
            state["tokens"] = [t.copy() for t in self._tokens]
            state["audio_norm"] = [n.to_list() for n in self._audio_norm]
        else:
            state["cache"] = self.backend.cache_to_numpy(self._cache)
        if include_buffers:
            state["buffers"] = {k: v.copy() for k, v in self._buf.items()}
            state["motion_tracked"] = self._motion_tracked
        return state

    def set_state(self, state: dict, include_buffers: bool = True) -> None:
        """Restore a snapshot taken by get_state on a session of the same bundle and settings."""
        if not isinstance(state, dict) or state.get("bundle") != self.bundle.id:
            raise TimarInputError("state: expected a get_state() snapshot of a session on this bundle")
        if self.window:
            self._tokens = tuple(np.array(t, np.float32, copy=True) for t in state["tokens"])
            self._audio_norm = tuple(RunningNorm.from_list(v, n.eps) for v, n in zip(state["audio_norm"], self._audio_norm))
        else:
            cache = np.asarray(state["cache"])
            if list(cache.shape) != list(self.backend.cache_to_numpy(self._cache).shape):
                raise TimarInputError(f"state: cache shape {list(cache.shape)} does not match this session's "
                                      "(same bundle, but another cfg setting?)")
            self._cache = self.backend.cache_from_numpy(cache)
        self._ring = TurnRing(self._ring.context_turns, self._ring.tokens_per_turn,
                              tuple(state["slot_age"]), self._context)
        self._noise = PhiloxNormal(self.seed)
        self._noise.set_state(state["noise"])
        self.turns = state["turns"]
        if include_buffers:
            self._buf = {k: np.array(v, copy=True) for k, v in state["buffers"].items()}
            self._motion_tracked = state["motion_tracked"]

    # ---- the turn ------------------------------------------------------------------------------
    def _turn(self, ua: np.ndarray, um: np.ndarray | None, aa: np.ndarray):
        """Run one turn without changing the session; returns (motion, commit)."""
        f, r = self.frames, self.rows
        # A user whose face is not tracked reads as the neutral face (all-zero FLAME parameters);
        # the SDK's models also get the "absent" flag, which replaces those tokens.
        raw = np.zeros((f, MOTION_DIM), np.float32) if um is None else um
        user_motion = ((raw - self._mean) / self._std).astype(np.float32)
        rep = lambda a: np.repeat(a[None], r, axis=0)  # noqa: E731
        uncond = np.array([0.0, 1.0][:r], np.float32)
        if self.window:
            norms = (self._audio_norm[0].update(ua), self._audio_norm[1].update(aa))
            feats = self.backend.encode_audio(np.stack([norms[0].apply(ua), norms[1].apply(aa)]))
            tokens = self.backend.embed_turn({"user_speech": rep(feats[0]), "agent_speech": rep(feats[1]),
                                              "user_motion": rep(user_motion), "uncond": uncond})
            visible = self._ring.visible_turns            # context experiment: fewer past turns
            n_past = len(self._tokens) if visible is None else min(visible, len(self._tokens))
            window = tokens
            if n_past:                                      # past turns (conditional row) + this turn
                past = np.concatenate(self._tokens[len(self._tokens) - n_past:])
                window = np.concatenate([np.repeat(past[None], r, axis=0), tokens], axis=1)
            z = self.backend.encode_window(window)
        else:
            feats = self.backend.encode_audio(np.stack([ua, aa]))
            inputs = {"user_speech": rep(feats[0]), "user_motion": rep(user_motion),
                      "agent_speech": rep(feats[1]), "agent_motion": np.zeros((r, f, MOTION_DIM), np.float32),
                      "agent_mask": np.ones((r, f), np.float32), "uncond": uncond,
                      "user_motion_absent": np.full(r, 1.0 if um is None else 0.0, np.float32),
                      "past_turn_age": self._ring.token_ages(r)}
            z, present = self.backend.encoder_step(inputs, self._cache)
        noise = PhiloxNormal(self.seed)
        noise.set_state(self._noise.get_state())
        x = sample_turn(self.backend.denoise, z.reshape(-1, z.shape[-1]), noise, self.schedule,
                        self.temperature, self.cfg)
        if self.history == "feedback":
            inputs.update(agent_motion=rep(x), agent_mask=np.zeros((r, f), np.float32),
                          uncond=np.zeros(r, np.float32))
            _, present = self.backend.encoder_step(inputs, self._cache)
        motion = (x * self._std + self._mean).astype(np.float32)

        def commit():
            if self.window:
                keep = self._ring.context_turns - 1
                self._tokens = (self._tokens + (tokens[0],))[-keep:] if keep else ()
                self._audio_norm = norms
            else:
                slot = self._ring.next_slot()
                if slot >= 0:
                    self._cache = self.backend.commit(self._cache, present, slot)
            self._ring = self._ring.advance()
            self._noise = noise
            self.turns += 1
        return motion, commit

    # ---- input checks --------------------------------------------------------------------------
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
        if not np.isfinite(m).all():
            raise TimarInputError(f"{name}: contains NaN or Inf")
        return m.astype(np.float32)
