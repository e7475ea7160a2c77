"""A model's bundle manifest (docs/DESIGN.md section 3), without ONNX: export writes it beside
the graphs it traced; `in_memory_bundle` (behind `Model.from_torch`) keeps it in memory beside
the torch modules themselves.
"""
from __future__ import annotations

import time

import timar_sdk
from timar_sdk.layout import (EXP, JAW, MOTION_DIM, MOTION_NAMES, NECK, SPECIAL_TOKENS,
                              special_token_positions, turn_layout)
from timar_sdk.model.graphs import cache_input_names
from timar_sdk.model.timar import Timar
from timar_sdk.runtime.bundle import GENERATOR, SCHEMA_VERSION, Bundle


def check_streamable(model: Timar) -> None:
    """ValueError unless `model` can stream turn by turn with a cache: a diffusion head and band
    attention (the ablations of the other kinds run through `full_forward_motion` instead)."""
    if model.cfg.head != "diffusion":
        raise ValueError("model: only diffusion-head models export (the MLP head is a training ablation)")
    if model.cfg.attention != "band":
        raise ValueError("model: full-attention models cannot stream with a cache; export needs attention='band'")


def _common_manifest(cfg, model_info: dict, source: str, ema: bool, motion_mean, motion_std,
                     alphas_cumprod, graphs: dict) -> dict:
    """The parts of a manifest that every kind of bundle has (docs/DESIGN.md section 3)."""
    lay = turn_layout(cfg.frames_per_turn)
    return {
        "schema_version": SCHEMA_VERSION,
        "format": "timar-bundle",
        "created_by": f"timar-sdk {timar_sdk.__version__}",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source_checkpoint": source,
        "source_weights": "ema" if ema else "model",
        "model": model_info,
        "fps": cfg.fps, "sample_rate": cfg.sample_rate,
        "frames_per_turn": cfg.frames_per_turn, "samples_per_turn": cfg.sample_rate * cfg.frames_per_turn // cfg.fps,
        "motion_dim": MOTION_DIM,
        "motion_layout": {"names": MOTION_NAMES, "exp": [EXP.start, EXP.stop],
                          "jaw": [JAW.start, JAW.stop], "neck": [NECK.start, NECK.stop]},
        "turn_layout": {"tokens_per_turn": cfg.tokens_per_turn, "special_tokens": list(SPECIAL_TOKENS),
                        "special_token_positions": special_token_positions(cfg.frames_per_turn),
                        **{k: list(v) for k, v in lay.items()}},
        "context_turns": cfg.context_turns,
        "motion_mean": motion_mean.tolist(), "motion_std": motion_std.tolist(),
        "diffusion": {"num_train_steps": len(alphas_cumprod), "prediction": "x0",
                      "variance": "learned_range", "schedule": "cosine",
                      # The float64 schedule itself, not the model's float32 buffer: float32 keeps
                      # only ~3 digits of 1 - alpha_bar near t = 0 (issue 13, item 12).
                      "alphas_cumprod": alphas_cumprod.tolist()},
        "generator": GENERATOR,
        "graphs": graphs,
        "engines": [],
    }


def build_manifest(model: Timar, graphs: dict[str, dict], source: str = "", ema: bool = True) -> dict:
    """The manifest of an SDK model's "cached" bundle; `graphs`: name -> file, sha256 and I/O."""
    c = model.cfg
    return {
        **_common_manifest(c, {**c.to_dict(), "num_params": model.num_params()}, source, ema,
                           model.motion_mean, model.motion_std, model.head.schedule, graphs),
        "attention": "cached",
        "history": c.history,
        "cache": {"layers": c.depth, "heads": c.heads, "head_dim": c.head_dim,
                  "slots": c.context_turns - 1, "tokens_per_slot": c.tokens_per_turn,
                  "empty_age": c.context_turns,
                  "past_key_values_shape": [c.depth, 2, "batch", c.heads, c.cache_tokens, c.head_dim],
                  "past_key_values_inputs": cache_input_names(c.depth)},
        "sampling": {"steps": c.steps, "temperature": c.temperature, "cfg": c.cfg},
    }


def build_window_manifest(model, graphs: dict[str, dict], source: str = "", ema: bool = True) -> dict:
    """The manifest of an authors' model's (timar_sdk.model.authors.WindowTimar) "window_recompute"
    bundle; `graphs` as for `build_manifest`."""
    c = model.cfg
    info = {**c.to_dict(), "family": "authors-encoder-only", "attention": "turn_causal",
            "num_params": model.num_params()}
    return {
        **_common_manifest(c, info, source, ema, model.motion_mean, model.motion_std,
                           model.head.schedule, graphs),
        "attention": "window_recompute",
        "history": "masked",
        "window": {"tokens_per_turn": c.tokens_per_turn, "max_turns": c.context_turns, "token_dim": c.width},
        "audio_normalization": {"mode": "running", "eps": 1e-7},
        "sampling": {"steps": c.steps, "temperature": 1.0, "cfg": 1.0},
    }


def with_defaults(manifest: dict, temperature: float | None = None, smoothing: dict | None = None) -> dict:
    """`manifest` with the runtimes' defaults set: the sampling temperature (None: the model
    config's) and the output smoothing, {region: tau seconds} (None: none)."""
    if temperature is not None:
        manifest["sampling"]["temperature"] = float(temperature)
    if smoothing:
        manifest["smoothing"] = {k: float(v) for k, v in smoothing.items()}
    return manifest


def in_memory_bundle(model) -> Bundle:
    """The bundle `model` (a `Timar`, or the authors' `WindowTimar`) would export to, with no
    files: its manifest, and as its graphs the torch modules that export would trace
    (timar_sdk.model.graphs). Only the torch backend runs it. Raises ValueError for a model
    that cannot stream (`check_streamable`)."""
    from timar_sdk.model.authors import WindowTimar
    from timar_sdk.model.graphs import graph_modules, window_graph_modules

    model = model.eval()
    if isinstance(model, WindowTimar):
        return Bundle.in_memory(build_window_manifest(model, {}, ema=False), window_graph_modules(model))
    check_streamable(model)
    return Bundle.in_memory(build_manifest(model, {}, ema=False), graph_modules(model))
