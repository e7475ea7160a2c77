"""The modules behind the bundle's three graphs, with their input names and example inputs.

Export traces them to ONNX; the torch backend runs them directly (so it needs torch, not onnx).
"""
from __future__ import annotations

import torch
from torch import nn

from timar_sdk.layout import MOTION_DIM
from timar_sdk.model.timar import Timar

STEP_INPUTS = ["user_speech", "user_motion", "agent_speech", "agent_motion", "agent_mask",
               "uncond", "user_motion_absent", "past_turn_age"]
"""encoder_step's inputs before the cache; the cache inputs (`cache_input_names`) follow them."""


def cache_input_names(layers: int) -> list[str]:
    """encoder_step's cache inputs, one per layer and key/value, each [B, H, (W-1)*P, hd]:
    input i is cache[i // 2, i % 2] of the runtime's cache tensor [L, 2, B, H, (W-1)*P, hd].

    Separate inputs rather than one stacked tensor: slicing a stacked input inside the graph
    copies the whole cache every turn, while a runtime passes views of its one buffer for free.
    """
    return [f"past_key_values.{layer}.{part}" for layer in range(layers) for part in ("key", "value")]


class AudioEncoderGraph(nn.Module):
    def __init__(self, model: Timar):
        super().__init__()
        self.encoder = model.audio_encoder

    def forward(self, waveform):
        return self.encoder(waveform)


class EncoderStepGraph(nn.Module):
    def __init__(self, model: Timar):
        super().__init__()
        self.model = model

    def forward(self, user_speech, user_motion, agent_speech, agent_motion, agent_mask, uncond,
                user_motion_absent, past_turn_age, *past_key_values):
        per_layer = [past_key_values[i:i + 2] for i in range(0, len(past_key_values), 2)]
        return self.model.forward_step(user_speech, user_motion, agent_speech, agent_motion, agent_mask,
                                       uncond, user_motion_absent, per_layer, past_turn_age)


class DenoiserGraph(nn.Module):
    def __init__(self, model: Timar):
        super().__init__()
        self.net = model.head.net

    def forward(self, x_t, t, z):
        return self.net(x_t, t, z)


def example_inputs(model: Timar, batch: int = 1) -> dict[str, dict[str, torch.Tensor]]:
    """Random inputs of every graph (used for tracing and by the parity tests)."""
    c = model.cfg
    f = c.frames_per_turn
    audio_dim = model.speech_proj.in_features
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {
        "audio_encoder": {"waveform": r(batch, c.samples_per_turn) * 0.1},
        "encoder_step": {
            "user_speech": r(batch, f, audio_dim), "user_motion": r(batch, f, MOTION_DIM),
            "agent_speech": r(batch, f, audio_dim), "agent_motion": r(batch, f, MOTION_DIM),
            "agent_mask": torch.ones(batch, f), "uncond": torch.zeros(batch),
            "user_motion_absent": torch.zeros(batch),
            "past_turn_age": torch.full((batch, c.cache_tokens), c.context_turns, dtype=torch.int64),
            **{name: r(batch, c.heads, c.cache_tokens, c.head_dim) for name in cache_input_names(c.depth)},
        },
        "denoiser": {"x_t": r(batch * f, MOTION_DIM), "t": torch.full((batch * f,), 500.0),
                     "z": r(batch * f, c.width)},
    }


GRAPH_OUTPUTS = {"audio_encoder": ["speech_features"], "encoder_step": ["z", "present_key_values"],
                 "denoiser": ["model_output"]}


def graph_modules(model: Timar) -> dict[str, nn.Module]:
    return {"audio_encoder": AudioEncoderGraph(model), "encoder_step": EncoderStepGraph(model),
            "denoiser": DenoiserGraph(model)}


# ---- window-recompute models (the authors' checkpoints, timar_sdk.model.authors) -------------
TOKEN_INPUTS = ["user_speech", "user_motion", "agent_speech", "uncond"]
WINDOW_GRAPH_OUTPUTS = {"audio_encoder": ["speech_features"], "token_embed": ["tokens"],
                        "window_encoder": ["z"], "denoiser": ["model_output"]}


class TokenEmbedGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, user_speech, user_motion, agent_speech, uncond):
        return self.model.embed_turn(user_speech, user_motion, agent_speech, uncond)


class WindowEncoderGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens):
        return self.model.forward_window(tokens)


def window_graph_modules(model) -> dict[str, nn.Module]:
    return {"audio_encoder": AudioEncoderGraph(model), "token_embed": TokenEmbedGraph(model),
            "window_encoder": WindowEncoderGraph(model), "denoiser": DenoiserGraph(model)}


def window_example_inputs(model, batch: int = 1, turns: int | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Random inputs of every window-mode graph (tracing, parity tests); `turns` in the window."""
    c = model.cfg
    f = c.frames_per_turn
    turns = c.context_turns if turns is None else turns
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {
        "audio_encoder": {"waveform": r(batch, c.sample_rate) * 0.1},
        "token_embed": {"user_speech": r(batch, f, c.speech_dim), "user_motion": r(batch, f, MOTION_DIM),
                        "agent_speech": r(batch, f, c.speech_dim), "uncond": torch.zeros(batch)},
        "window_encoder": {"tokens": r(batch, turns * c.tokens_per_turn, c.width)},
        "denoiser": {"x_t": r(batch * f, MOTION_DIM), "t": torch.full((batch * f,), 500.0),
                     "z": r(batch * f, c.width)},
    }
