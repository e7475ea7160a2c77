"""Checkpoints in the authors' format (CoderChen01/towards-seamless-interaction) with random
values, and a small random wav2vec2 saved with `save_pretrained`, for the import tests.

The key list below is written from their code as documentation (model/timar.py: TIMAR.__init__
with use_encoder_only=True; timm's vision_transformer.Block; model/diffloss.py: SimpleMLPAdaLN),
independently of timar_sdk.model.authors, so the importer is checked against it, not against
itself.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

# model name -> (encoder_embed_dim, encoder_depth + decoder_depth, heads), their factories
THEIR_MODELS = {"timar_base": (768, 24, 12), "timar_large": (1024, 32, 16)}
# Not theirs: a small model in the same format, for the default test run (timar_base's import,
# export and runtime need more than 4 GB). The importer knows it only through a test-registered
# AUTHORS_PRESETS entry (tests/test_authors.py). Its token and diffusion widths differ from each
# other and from the block width, so a transposed or swapped weight cannot pass as right.
SMALL_MODELS = {"timar_test": (64, 2, 4)}
SMALL_TOKEN_DIM, SMALL_DIFF_WIDTH, SMALL_DIFF_DEPTH = 48, 96, 2


def model_dims(model: str) -> dict[str, int]:
    """width, blocks, heads and the args' token_dim, diff_width, diff_depth of a model above (the
    release command's 1024, 1024, 3 for theirs)."""
    if model in THEIR_MODELS:
        (width, blocks, heads), extra = THEIR_MODELS[model], (1024, 1024, 3)
    else:
        (width, blocks, heads), extra = SMALL_MODELS[model], (SMALL_TOKEN_DIM, SMALL_DIFF_WIDTH, SMALL_DIFF_DEPTH)
    return dict(width=width, blocks=blocks, heads=heads, **dict(zip(("token_dim", "diff_width", "diff_depth"), extra)))


def model_state_shapes(model: str, speech_dim: int = 1024) -> dict[str, tuple]:
    d = model_dims(model)
    return authors_state_shapes(d["width"], d["blocks"], token_dim=d["token_dim"], speech_dim=speech_dim,
                                diff_width=d["diff_width"], diff_depth=d["diff_depth"])


def model_args(model: str, speech_dim: int = 1024, **overrides) -> argparse.Namespace:
    """their_args with the model's token/diffusion widths (the same as their_args' for theirs)."""
    d = model_dims(model)
    return their_args(model, speech_dim, **{"token_embed_dim": d["token_dim"], "diffloss_w": d["diff_width"],
                                            "diffloss_d": d["diff_depth"], **overrides})


def authors_state_shapes(width: int, blocks: int, token_dim: int = 1024, speech_dim: int = 1024,
                         diff_width: int = 1024, diff_depth: int = 3, window: int = 880) -> dict[str, tuple]:
    """Key -> shape of the authors' encoder-only TIMAR state dict (registration order)."""
    s = {
        "motion_encoder.0.weight": (token_dim // 2, 56), "motion_encoder.0.bias": (token_dim // 2,),
        "motion_encoder.2.weight": (token_dim, token_dim // 2), "motion_encoder.2.bias": (token_dim,),
        "speech_projection.weight": (token_dim, speech_dim), "speech_projection.bias": (token_dim,),
        "sep_tok_emb.weight": (10, token_dim),
        "fake_latent": (1, token_dim),
        "z_proj.weight": (width, token_dim), "z_proj.bias": (width,),
        "z_proj_ln.weight": (width,), "z_proj_ln.bias": (width,),
        "mask_token": (1, 1, width),
        "encoder_pos_embed_learned": (1, window, width),
    }
    for i in range(blocks):
        p = f"encoder_blocks.{i}."
        s.update({p + "norm1.weight": (width,), p + "norm1.bias": (width,),
                  p + "attn.qkv.weight": (3 * width, width), p + "attn.qkv.bias": (3 * width,),
                  p + "attn.proj.weight": (width, width), p + "attn.proj.bias": (width,),
                  p + "norm2.weight": (width,), p + "norm2.bias": (width,),
                  p + "mlp.fc1.weight": (4 * width, width), p + "mlp.fc1.bias": (4 * width,),
                  p + "mlp.fc2.weight": (width, 4 * width), p + "mlp.fc2.bias": (width,)})
    s.update({"encoder_norm.weight": (width,), "encoder_norm.bias": (width,),
              "diffusion_pos_embed_learned": (1, window, width)})
    n = "diffloss.net."
    s.update({n + "time_embed.mlp.0.weight": (diff_width, 256), n + "time_embed.mlp.0.bias": (diff_width,),
              n + "time_embed.mlp.2.weight": (diff_width, diff_width), n + "time_embed.mlp.2.bias": (diff_width,),
              n + "cond_embed.weight": (diff_width, width), n + "cond_embed.bias": (diff_width,),
              n + "input_proj.weight": (diff_width, 56), n + "input_proj.bias": (diff_width,)})
    for j in range(diff_depth):
        p = f"{n}res_blocks.{j}."
        s.update({p + "in_ln.weight": (diff_width,), p + "in_ln.bias": (diff_width,),
                  p + "mlp.0.weight": (diff_width, diff_width), p + "mlp.0.bias": (diff_width,),
                  p + "mlp.2.weight": (diff_width, diff_width), p + "mlp.2.bias": (diff_width,),
                  p + "adaLN_modulation.1.weight": (3 * diff_width, diff_width),
                  p + "adaLN_modulation.1.bias": (3 * diff_width,)})
    s.update({n + "final_layer.linear.weight": (112, diff_width), n + "final_layer.linear.bias": (112,),
              n + "final_layer.adaLN_modulation.1.weight": (2 * diff_width, diff_width),
              n + "final_layer.adaLN_modulation.1.bias": (2 * diff_width,)})
    return s


def their_args(model: str = "timar_base", speech_dim: int = 1024, **overrides) -> argparse.Namespace:
    """The training arguments their main.py saves (the release command's values)."""
    args = dict(model=model, motion_fps=25, speech_frequency=16000, chunk_second=1, max_context_time=8,
                speech_snippet_embed_dim=speech_dim, motion_embed_dim=56, token_embed_dim=1024,
                use_causal_attn=True, use_encoder_only=True, mask_ratio_min=0.7, cond_drop_prob=0.1,
                attn_dropout=0.1, proj_dropout=0.1, diffloss_d=3, diffloss_w=1024, noise_schedule="cosine",
                epsilon_pred=False, clip_denoised=False, use_kl=False, rescale_learned_sigmas=False,
                num_sampling_steps="5", diffusion_batch_mul=4, use_mseloss=False, do_norm=False,
                num_iter=1, cfg=1.0, temperature=1.0, mask_history_agent=True, seed=6666, ema_rate=0.9999,
                mean=np.zeros(56, np.float32), std=np.ones(56, np.float32))
    args.update(overrides)
    return argparse.Namespace(**args)


def random_state(shapes: dict[str, tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values of a trained-looking scale: LayerNorm weights near 1, the rest small."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, shape in shapes.items():
        t = torch.randn(*shape, generator=g)
        if k.endswith(("norm1.weight", "norm2.weight", "ln.weight", "encoder_norm.weight")):
            t = 1 + 0.1 * t
        elif k.endswith(".weight") and len(shape) == 2:
            t = t / np.sqrt(shape[1])       # unit-variance outputs for unit-variance inputs
        else:
            t = 0.02 * t
        state[k] = t
    return state


def write_authors_checkpoint(path: Path, model: str = "timar_base", speech_dim: int = 1024,
                             state: dict | None = None, **arg_overrides) -> Path:
    if state is None:
        state = random_state(model_state_shapes(model, speech_dim))
    ema = {k: v + 0.001 for k, v in state.items()}      # distinguishable from the raw weights
    torch.save({"model": state, "model_ema": ema, "optimizer": {"state": {}, "param_groups": []},
                "epoch": 399, "scaler": {"scale": 65536.0}, "args": model_args(model, speech_dim, **arg_overrides)},
               path)
    return path


def write_small_wav2vec2(directory: Path, hidden: int = 32) -> Path:
    """A randomly initialised wav2vec2 with lv60-self's structure (stable layer norm, layer-norm
    feature extractor, convolutions with bias, so the features depend on the input level), shrunk,
    saved with save_pretrained."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model
    torch.manual_seed(0)
    cfg = Wav2Vec2Config(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * hidden,
                         conv_dim=(32,) * 7, conv_bias=True, do_stable_layer_norm=True, feat_extract_norm="layer",
                         num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
    Wav2Vec2Model(cfg).eval().save_pretrained(directory)
    return directory


def write_tiny_window_bundle(directory: Path, seed: int = 0) -> Path:
    """A small window-recompute bundle (the authors' structure, shrunk; random weights), quick to
    export and run: for tests of runtimes other than the import itself (e.g. the native one)."""
    from timar_sdk.export.onnx_export import export_window_bundle
    from timar_sdk.model.authors import WindowTimar, WindowTimarConfig

    directory.mkdir(parents=True, exist_ok=True)
    w2v = write_small_wav2vec2(directory / "wav2vec2", hidden=32)
    cfg = WindowTimarConfig(preset="timar_tiny_test", width=64, depth=2, heads=2, token_dim=64, speech_dim=32,
                            diff_width=64, diff_depth=2, wav2vec2_path=str(w2v))
    torch.manual_seed(seed)
    model = WindowTimar(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("audio_encoder."):
                p.add_(torch.randn_like(p) * 0.05)   # no parameter left at its all-zero start
    export_window_bundle(model, directory / "bundle", source="random weights")
    return directory / "bundle"
