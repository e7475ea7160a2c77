"""The authors' released TIMAR models (encoder-only, turn-causal): import and a window-recompute module.

Their checkpoint (`TIMAR.pth`, from CoderChen01/towards-seamless-interaction) differs from the
SDK's own models in one way that matters for streaming: its position embeddings are *absolute
within the current window* (`encoder_pos_embed_learned [1, W*P, D]`). Once the window holds W
turns every turn shifts by P positions, so past keys/values change and cannot be cached. This
module therefore runs the whole window every turn, split where the runtime can reuse work:

    embed_turn(one turn's inputs)  -> tokens [B, P, D]   (z_proj done, agent motion = mask token)
    forward_window(tokens [B, N, D], N = P..W*P, current turn last) -> z [B, F, D]

The runtime keeps the last W-1 turns' tokens in a ring and calls forward_window each turn, as
the authors' `sample()` does with `--mask_history_agent --num_iter 1` (their evaluation setting):
past agent motion is always the mask token, so a turn's tokens never change once computed.

Loading is weights-only: `torch.load(weights_only=True)` with `argparse.Namespace` and plain
numpy arrays (their args hold the motion mean/std as arrays) as the only allowed globals.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from timar_sdk.layout import MOTION_DIM, tokens_per_turn, turn_layout
from timar_sdk.model.audio_encoder import Wav2Vec2Encoder
from timar_sdk.model.checkpoint import load_weights_only
from timar_sdk.model.config import TimarConfig
from timar_sdk.model.diffusion import LN_EPS, DiffusionHead
from timar_sdk.model.timar import MASK_BIAS, Block

# Their factories (model/timar.py): encoder-only models stack encoder_depth + decoder_depth blocks.
AUTHORS_PRESETS = {"timar_base": (768, 24, 12), "timar_large": (1024, 32, 16), "timar_huge": (1280, 40, 16)}


@dataclass
class WindowTimarConfig:
    """Structure of an authors' encoder-only, turn-causal TIMAR (their argparse names in comments)."""
    preset: str = "timar_large"        # --model
    width: int = 1024                  # encoder_embed_dim
    depth: int = 32                    # encoder_depth + decoder_depth
    heads: int = 16
    token_dim: int = 1024              # --token_embed_dim
    speech_dim: int = 1024             # --speech_snippet_embed_dim (wav2vec2 hidden size)
    diff_width: int = 1024             # --diffloss_w
    diff_depth: int = 3                # --diffloss_d
    mlp_ratio: float = 4.0
    context_turns: int = 8             # --max_context_time / --chunk_second
    frames_per_turn: int = 25          # --motion_fps * --chunk_second
    fps: int = 25
    sample_rate: int = 16000
    do_norm: bool = False              # --do_norm: motion normalised with a stats JSON
    steps: int = 5                     # their evaluation: --num_sampling_steps 5
    wav2vec2_path: str | None = None

    @property
    def tokens_per_turn(self) -> int:
        return tokens_per_turn(self.frames_per_turn)

    @property
    def window_tokens(self) -> int:
        return self.context_turns * self.tokens_per_turn

    def to_dict(self) -> dict:
        return asdict(self)


class WindowTimar(nn.Module):
    """The authors' encoder-only TIMAR, split into embed_turn and forward_window (module doc)."""

    def __init__(self, cfg: WindowTimarConfig):
        super().__init__()
        self.cfg = cfg
        f, tk, d = cfg.frames_per_turn, cfg.token_dim, cfg.width
        self.audio_encoder = Wav2Vec2Encoder(cfg.wav2vec2_path, f)
        self.motion_encoder = nn.Sequential(nn.Linear(MOTION_DIM, tk // 2), nn.ReLU(),
                                            nn.Linear(tk // 2, tk), nn.ReLU())
        self.speech_projection = nn.Linear(cfg.speech_dim, tk)
        self.special = nn.Parameter(torch.zeros(10, tk))
        self.fake_latent = nn.Parameter(torch.zeros(tk))
        self.z_proj = nn.Linear(tk, d)
        self.z_proj_ln = nn.LayerNorm(d, eps=LN_EPS)
        self.mask_token = nn.Parameter(torch.zeros(d))
        self.pos_embed = nn.Parameter(torch.zeros(cfg.window_tokens, d))
        block_cfg = TimarConfig(width=d, depth=cfg.depth, heads=cfg.heads, mlp_ratio=cfg.mlp_ratio,
                                dropout=0.0, context_turns=cfg.context_turns)
        self.blocks = nn.ModuleList(Block(block_cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=LN_EPS)
        self.diffusion_pos_embed = nn.Parameter(torch.zeros(cfg.window_tokens, d))
        self.head = DiffusionHead(d, cfg.diff_width, cfg.diff_depth, batch_mul=1,
                                  decoder_nll="discretized", bounded_variance=False)
        self.register_buffer("motion_mean", torch.zeros(MOTION_DIM))
        self.register_buffer("motion_std", torch.ones(MOTION_DIM))
        self._agent = turn_layout(f)["agent_motion"]
        # How ONNX export writes attention: "fused" (ONNX Runtime's MultiHeadAttention, one operator
        # per block) or "portable" (MatMul/Softmax, the ops every runtime runs). Eager torch is the
        # same either way; export_window_bundle(fused_attention=...) sets it while tracing.
        self.onnx_attention = "fused"

    def num_params(self) -> int:
        """Parameters of the authors' model: the speech model is not counted (it is not in their
        file), nor the SDK blocks' turn-distance biases, which this model never uses."""
        return sum(p.numel() for n, p in self.named_parameters()
                   if not n.startswith("audio_encoder.") and not n.endswith(".turn_bias"))

    def embed_turn(self, user_speech, user_motion, agent_speech, uncond) -> torch.Tensor:
        """One turn's tokens. user_speech/agent_speech [B, F, Ds] speech-model features;
        user_motion [B, F, 56] (normalised when do_norm); uncond [B] 0/1 (1: the user's tokens
        become the fake latent, the CFG row). Returns [B, P, D] before positions."""
        b, f, _ = user_motion.shape
        user = torch.cat([self.speech_projection(user_speech), self.motion_encoder(user_motion)], dim=1)
        unc = uncond[:, None, None]
        user = user * (1 - unc) + self.fake_latent * unc
        sp = self.special.expand(b, -1, -1)
        pieces = [sp[:, 0:2], user[:, :f], sp[:, 2:4], user[:, f:], sp[:, 4:6],
                  self.speech_projection(agent_speech), sp[:, 6:8]]
        before = self.z_proj(torch.cat(pieces, dim=1))                  # tokens up to <A_MO>
        after = self.z_proj(sp[:, 8:10])                                # </A_MO> </TURN>
        masked = self.mask_token.expand(b, f, -1)                       # agent motion: to generate
        return torch.cat([before, masked, after], dim=1)

    def forward_window(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, N, D], N = k*P (k = 1..W turns, the current one last) -> z [B, F, D] of the
        current turn's agent-motion tokens. Positions count from the window's first token."""
        p = self.cfg.tokens_per_turn
        # Index arithmetic on tensors, not Python ints, so the exported graph keeps N dynamic.
        index = torch.cumsum(torch.ones_like(tokens[0, :, 0], dtype=torch.long), 0) - 1     # 0..N-1
        x = self.z_proj_ln(tokens + self.pos_embed[index])
        turn = torch.div(index, p, rounding_mode="floor")
        # Turn-causal: a token sees every token of its own and earlier turns of the window.
        bias = torch.where(turn[None, :] <= turn[:, None], 0.0, MASK_BIAS)[None, None].to(x.dtype)
        current = slice(self._agent[0] - p, self._agent[1] - p)       # agent motion of the last turn
        fused = self.onnx_attention == "fused" and torch.onnx.is_in_onnx_export()
        for i, block in enumerate(self.blocks):
            # The last block: the current turn sees the whole window (no mask), only F queries are read.
            mask, keep = (bias, None) if i < len(self.blocks) - 1 else (None, current)
            x = fused_attention_block(block, x, mask, keep) if fused else block(x, mask, keep=keep)[0]
        return self.norm(x) + self.diffusion_pos_embed[index][current]

    def normalize(self, motion: torch.Tensor) -> torch.Tensor:
        return (motion - self.motion_mean) / self.motion_std

    def denormalize(self, motion: torch.Tensor) -> torch.Tensor:
        return motion * self.motion_std + self.motion_mean


class _MultiHeadAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(hd) + mask) v over `heads` heads, with the input projection's bias
    added to q, k, v first. Eager: torch's SDPA. Exported: one com.microsoft MultiHeadAttention
    node, which ONNX Runtime's CPU provider runs per head with the scores kept in cache, instead
    of four [B, H, N, N] passes through memory (MatMul, Add mask, Softmax, MatMul)."""

    @staticmethod
    def forward(ctx, q, k, v, qkv_bias, mask, heads: int):
        """q [B, S, D], k/v [B, L, D] without bias; qkv_bias [3D]; mask broadcastable to [B, H, S, L]
        (additive) or None -> [B, S, D]."""
        b, s, d = q.shape
        bq, bk, bv = qkv_bias.chunk(3)
        split = lambda t, bt: (t + bt).reshape(b, t.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731
        out = nn.functional.scaled_dot_product_attention(split(q, bq), split(k, bk), split(v, bv), attn_mask=mask)
        return out.transpose(1, 2).reshape(b, s, d)

    @staticmethod
    def symbolic(g, q, k, v, qkv_bias, mask, heads: int):
        from torch.onnx import symbolic_helper
        inputs = [q, k, v, qkv_bias]
        if not symbolic_helper._is_none(mask):     # inputs 4 (key_padding_mask) empty, 5 attention_bias
            inputs += [symbolic_helper._optional_input_placeholder_tensor(g), mask]
        out = g.op("com.microsoft::MultiHeadAttention", *inputs, num_heads_i=heads)
        out.setType(q.type())
        return out


FUSED_ATTENTION_OPS = frozenset({"com.microsoft:MultiHeadAttention"})
"""The non-standard operators a window_encoder graph exported with fused attention uses."""


def fused_attention_block(block: Block, x: torch.Tensor, mask: torch.Tensor | None,
                          keep: slice | None) -> torch.Tensor:
    """`block(x, mask, keep=keep)[0]` (timar_sdk.model.timar.Block, eval mode) with attention as
    one fused operator in ONNX: x [B, N, D] -> [B, N or kept, D]."""
    attn, d = block.attn, x.shape[-1]
    q, k, v = nn.functional.linear(block.norm1(x), attn.qkv.weight).split(d, dim=-1)
    if keep is not None:
        q = q[:, keep]
    h = attn.proj(_MultiHeadAttention.apply(q, k, v, attn.qkv.bias, mask, attn.heads))
    x = (x if keep is None else x[:, keep]) + h
    return x + block.mlp(block.norm2(x))


# ---- the authors' checkpoint ------------------------------------------------------------------
ALLOWED_DATA = ("tensors, dicts, lists, tuples, numbers, strings, argparse.Namespace and numpy arrays, "
                "dtypes and scalars")


def _safe_globals() -> list:
    """What the weights-only loader may construct besides torch's own data: argparse.Namespace and
    numpy arrays. numpy 2 pickles arrays and scalars as numpy._core.multiarray._reconstruct /
    .scalar, numpy 1.x as numpy.core.multiarray.*; both names map to the installed numpy's
    functions (numpy 2 reads numpy 1.x array pickles), nothing else under those modules is allowed."""
    core = getattr(np, "_core", None) or np.core
    extra = [getattr(np.dtypes, n) for n in ("Float32DType", "Float64DType", "Int64DType", "Int32DType",
                                             "BoolDType") if hasattr(np, "dtypes") and hasattr(np.dtypes, n)]
    aliases = [(fn, f"{module}.{fn.__name__}") for fn in (core.multiarray._reconstruct, core.multiarray.scalar)
               for module in ("numpy._core.multiarray", "numpy.core.multiarray")]
    return [argparse.Namespace, np.ndarray, np.dtype, *aliases, *extra]


def read_authors_checkpoint(path: str | Path) -> dict:
    """The checkpoint dict, read without executing pickled code: tensors, containers, numbers,
    strings, argparse.Namespace and numpy arrays (pickled by numpy 1.x or 2) only; anything else
    is refused, naming the refused global. A damaged file reads "corrupt or truncated file"."""
    return load_weights_only(path, _safe_globals(), ALLOWED_DATA)


def is_authors_checkpoint(ckpt: object) -> bool:
    """The authors' layout: {'model': state dict with 'encoder_blocks.*', 'args': Namespace, ...}."""
    return (isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict)
            and any(str(k).startswith("encoder_blocks.") for k in ckpt["model"]))


def authors_key_map(cfg: WindowTimarConfig) -> dict[str, str]:
    """Their state-dict key -> this module's key, for every parameter of the released structure."""
    m = {"motion_encoder.0.weight": "motion_encoder.0.weight", "motion_encoder.0.bias": "motion_encoder.0.bias",
         "motion_encoder.2.weight": "motion_encoder.2.weight", "motion_encoder.2.bias": "motion_encoder.2.bias",
         "speech_projection.weight": "speech_projection.weight", "speech_projection.bias": "speech_projection.bias",
         "sep_tok_emb.weight": "special", "fake_latent": "fake_latent",
         "z_proj.weight": "z_proj.weight", "z_proj.bias": "z_proj.bias",
         "z_proj_ln.weight": "z_proj_ln.weight", "z_proj_ln.bias": "z_proj_ln.bias",
         "mask_token": "mask_token", "encoder_pos_embed_learned": "pos_embed",
         "encoder_norm.weight": "norm.weight", "encoder_norm.bias": "norm.bias",
         "diffusion_pos_embed_learned": "diffusion_pos_embed"}
    for i in range(cfg.depth):
        for part in ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            ours = part.replace("mlp.fc1", "mlp.0").replace("mlp.fc2", "mlp.3")
            for wb in ("weight", "bias"):
                m[f"encoder_blocks.{i}.{part}.{wb}"] = f"blocks.{i}.{ours}.{wb}"
    net = "diffloss.net."
    pairs = [("time_embed.mlp.0", "time_embed.mlp.0"), ("time_embed.mlp.2", "time_embed.mlp.2"),
             ("cond_embed", "cond_embed"), ("input_proj", "input_proj"),
             ("final_layer.linear", "final.linear"), ("final_layer.adaLN_modulation.1", "final.adaLN.1")]
    for j in range(cfg.diff_depth):
        pairs += [(f"res_blocks.{j}.in_ln", f"blocks.{j}.in_ln"), (f"res_blocks.{j}.mlp.0", f"blocks.{j}.mlp.0"),
                  (f"res_blocks.{j}.mlp.2", f"blocks.{j}.mlp.2"),
                  (f"res_blocks.{j}.adaLN_modulation.1", f"blocks.{j}.adaLN.1")]
    for theirs, ours in pairs:
        for wb in ("weight", "bias"):
            m[f"{net}{theirs}.{wb}"] = f"head.net.{ours}.{wb}"
    return m


def config_from_authors(ckpt: dict, wav2vec2_path: str | None) -> WindowTimarConfig:
    """The structure from the checkpoint's args and weight shapes; unsupported variants refused."""
    args = ckpt.get("args")
    if not isinstance(args, argparse.Namespace):
        raise ValueError("ckpt: the authors' checkpoint has no 'args' (argparse.Namespace); it is needed "
                         "to tell turn-causal from full-attention models")
    state = ckpt["model"]
    if "decoder_embed.weight" in state or getattr(args, "use_encoder_only", True) is False:
        raise ValueError("ckpt: an encoder-decoder TIMAR (use_encoder_only=False) is not supported; "
                         "only the encoder-only, turn-causal models (the released TIMAR.pth) are")
    if not getattr(args, "use_causal_attn", False):
        raise ValueError("ckpt: a full-attention TIMAR (use_causal_attn=False, the paper's ablation) "
                         "is not supported: it is not causal across turns and cannot stream")
    if not any(k.startswith("diffloss.") for k in state) or getattr(args, "use_mseloss", False):
        raise ValueError("ckpt: an MLP-head TIMAR (use_mseloss, the paper's ablation) is not supported; "
                         "only diffusion-head models are")
    if getattr(args, "epsilon_pred", False):
        raise ValueError("ckpt: epsilon_pred=True is not supported (the runtime samples x0-predicting heads)")
    if getattr(args, "noise_schedule", "cosine") != "cosine":
        raise ValueError(f"ckpt: noise_schedule {args.noise_schedule!r} is not supported (cosine only)")
    if getattr(args, "chunk_second", 1) != 1 or getattr(args, "motion_fps", 25) != 25:
        raise ValueError("ckpt: only chunk_second 1 and motion_fps 25 are supported")
    name = getattr(args, "model", "timar_large")
    if name not in AUTHORS_PRESETS:
        raise ValueError(f"ckpt: args.model {name!r} is not one of {sorted(AUTHORS_PRESETS)}")
    width, depth, heads = AUTHORS_PRESETS[name]
    qkv = state.get("encoder_blocks.0.attn.qkv.weight")
    if qkv is None or tuple(qkv.shape) != (3 * width, width):
        raise ValueError(f"ckpt: {name} expects encoder_blocks.0.attn.qkv.weight of shape "
                         f"{(3 * width, width)}, got {None if qkv is None else tuple(qkv.shape)}")
    proj = state.get("diffloss.net.input_proj.weight")
    if not isinstance(proj, torch.Tensor) or proj.ndim != 2:
        raise ValueError("ckpt: the state dict has no diffloss.net.input_proj.weight [width, 56] (the "
                         "diffusion head's input layer)")
    diff_depth = len({k.split(".")[3] for k in state if k.startswith("diffloss.net.res_blocks.")})
    return WindowTimarConfig(
        preset=name, width=width, depth=depth, heads=heads,
        token_dim=int(getattr(args, "token_embed_dim", 1024)),
        speech_dim=int(getattr(args, "speech_snippet_embed_dim", 1024)),
        diff_width=int(proj.shape[0]), diff_depth=diff_depth,
        context_turns=int(getattr(args, "max_context_time", 8)), do_norm=bool(getattr(args, "do_norm", False)),
        wav2vec2_path=wav2vec2_path)


def read_motion_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The authors' stats JSON ({'exp': {'mean', 'std'}, 'jawpose': ..., 'neck': ...}) -> mean, std [56]."""
    try:
        stats = json.loads(Path(path).read_text())
        mean = np.concatenate([np.asarray(stats[k]["mean"], np.float32).reshape(-1) for k in ("exp", "jawpose", "neck")])
        std = np.concatenate([np.asarray(stats[k]["std"], np.float32).reshape(-1) for k in ("exp", "jawpose", "neck")])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"stats: {path} is not the authors' stats JSON with exp/jawpose/neck mean and std ({e})") from None
    if mean.shape != (MOTION_DIM,) or std.shape != (MOTION_DIM,):
        raise ValueError(f"stats: expected 50 + 3 + 3 = 56 means and stds, got {mean.shape[0]} and {std.shape[0]}")
    # Their normalisation divides by (std + 1e-8) with std floored at float32 eps; fold both in.
    return mean, np.maximum(std, np.finfo(np.float32).eps) + np.float32(1e-8)


def load_authors_model(ckpt_path: str | Path | dict, wav2vec2_path: str | None, ema: bool = True,
                       motion_stats: tuple[np.ndarray, np.ndarray] | None = None, *,
                       name: str | None = None) -> WindowTimar:
    """A WindowTimar in eval mode from the authors' checkpoint (a path, or the dict
    `read_authors_checkpoint` returned, then `name` is the file named in errors; their EMA weights
    by default, which is what they evaluate with) and a local wav2vec2 directory. motion_stats:
    (mean, std) [56] for a model trained with do_norm (`read_motion_stats`). Missing/unexpected
    keys, wrong shapes, unsupported variants and a missing or mismatched wav2vec2 give one
    ValueError line naming the file and the problem."""
    Wav2Vec2Encoder.check_path(wav2vec2_path)          # before reading a large checkpoint
    if isinstance(ckpt_path, (str, Path)):
        ckpt, where = read_authors_checkpoint(ckpt_path), str(ckpt_path)
    else:
        ckpt, where = ckpt_path, name or "checkpoint"
    try:
        return _authors_model(ckpt, wav2vec2_path, ema, motion_stats)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
        msg = str(e)
        if isinstance(e, ValueError) and not msg.startswith("ckpt: "):
            raise                       # stats: and wav2vec2: errors name their own files
        detail = (msg[len("ckpt: "):] if msg.startswith("ckpt: ") else
                  f"not a loadable authors' TIMAR checkpoint ({type(e).__name__}: {msg})")
        raise ValueError(f"ckpt: {where}: {' '.join(detail.split())}") from e


def _authors_model(ckpt, wav2vec2_path, ema, motion_stats) -> WindowTimar:
    if not is_authors_checkpoint(ckpt):
        raise ValueError("ckpt: not an authors' TIMAR checkpoint (no 'model' state dict with "
                         "encoder_blocks.* keys)")
    cfg = config_from_authors(ckpt, wav2vec2_path)
    which = "model_ema" if ema and isinstance(ckpt.get("model_ema"), dict) else "model"
    state = ckpt[which]
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"ckpt: '{which}' holds {len(bad)} entries that are not tensors ({bad[:3]})")
    if cfg.do_norm and motion_stats is None:
        raise ValueError("stats: this checkpoint was trained with --do_norm; pass the stats JSON it was "
                         "trained with (--stats, their data/stat_flame.json)")
    mapping = authors_key_map(cfg)
    missing = sorted(set(mapping) - set(state))
    unexpected = sorted(set(state) - set(mapping))
    if missing or unexpected:
        raise ValueError(f"ckpt: the state dict does not match {cfg.preset} (encoder-only, {cfg.depth} blocks): "
                         f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)}), "
                         f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)})")
    model = WindowTimar(cfg)
    if model.audio_encoder.out_dim != cfg.speech_dim:
        raise ValueError(f"wav2vec2: {wav2vec2_path} has hidden size {model.audio_encoder.out_dim}, but the "
                         f"checkpoint's speech_projection expects {cfg.speech_dim} "
                         f"(facebook/wav2vec2-large-960h-lv60-self has 1024)")
    ours = model.state_dict()
    converted = {}
    for theirs, name in mapping.items():
        want = _their_shape(theirs, tuple(ours[name].shape))
        if tuple(state[theirs].shape) not in (want, tuple(ours[name].shape)):   # same size is not enough
            raise ValueError(f"ckpt: {theirs} has shape {tuple(state[theirs].shape)}, expected {want} for {cfg.preset}")
        converted[name] = state[theirs].float().reshape(ours[name].shape)   # theirs keep leading 1s
    model.load_state_dict(converted, strict=False)    # turn_bias and the speech model are not theirs
    if cfg.do_norm:
        model.motion_mean.copy_(torch.as_tensor(motion_stats[0], dtype=torch.float32))
        model.motion_std.copy_(torch.as_tensor(motion_stats[1], dtype=torch.float32))
    return model.eval()


def _their_shape(key: str, ours: tuple[int, ...]) -> tuple[int, ...]:
    if key in ("mask_token",):
        return (1, 1, *ours)
    if key in ("fake_latent",) or key.endswith("pos_embed_learned"):
        return (1, *ours)
    return ours

