"""TIMAR with cache-exact positions and band turn-causal attention (docs/DESIGN.md sections 1-2).

Two ways to run the same function:
- `forward_full`: a whole clip of T turns at once with the band mask (training, reference);
- `forward_step`: one turn against an explicit cache of the previous W-1 turns' keys/values.
Positions are learned *inside* a turn and attention gets a learned per-head bias indexed by turn
distance, so a past turn's keys and values never change once computed.

Shapes: B batch, T turns, F frames per turn, P = 110 tokens per turn, D width, Da audio width.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from timar_sdk.layout import MOTION_DIM, special_token_positions, turn_layout
from timar_sdk.model.audio_encoder import LogMelEncoder, Wav2Vec2Encoder
from timar_sdk.model.config import TimarConfig
from timar_sdk.model.diffusion import LN_EPS, DiffusionHead, MLPHead

MASK_BIAS = -1e4
"""Additive attention bias of a key that may not be attended (large enough for exp() to give 0)."""


class Attention(nn.Module):
    def __init__(self, cfg: TimarConfig):
        super().__init__()
        self.heads, self.dropout = cfg.heads, cfg.dropout
        self.scale = cfg.head_dim ** -0.5
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.proj_drop = nn.Dropout(cfg.dropout)
        # Learned bias per head and turn distance d = 0..W-1; column W is the "masked" bias.
        self.turn_bias = nn.Parameter(torch.zeros(cfg.heads, cfg.context_turns))

    def bias_table(self) -> torch.Tensor:
        """[H, W + 1]: bias by turn distance, last column masks."""
        masked = torch.full_like(self.turn_bias[:, :1], MASK_BIAS)
        return torch.cat([self.turn_bias, masked], dim=1)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, past_kv: torch.Tensor | None = None,
                keep: slice | None = None):
        """x [B, N, D]; bias broadcastable to [B, H, N, M + N] or None; past_kv [2, B, H, M, hd] or None;
        keep: the query tokens whose outputs are wanted (all when None; keys and values always
        come from all N). Returns the output [B, N or kept, D] and this call's keys/values
        [2, B, H, N, hd]."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        present = torch.stack([k, v])
        if keep is not None:
            q = q[:, :, keep]
            n = q.shape[2]
        if past_kv is not None:
            k = torch.cat([past_kv[0], k], dim=2)
            v = torch.cat([past_kv[1], v], dim=2)
        if torch.onnx.is_in_onnx_export():
            # The same function written out: SDPA's ONNX export scales q and k separately and
            # materialises k^T, whereas q @ k^T * scale becomes one fused MatMul in ONNX Runtime.
            att = torch.matmul(q, k.transpose(-2, -1)) * self.scale
            out = torch.matmul((att if bias is None else att + bias).softmax(dim=-1), v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                                 dropout_p=self.dropout if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, d))), present


class Block(nn.Module):
    """Pre-norm transformer block: LN -> attention -> residual; LN -> MLP (erf GELU) -> residual."""

    def __init__(self, cfg: TimarConfig):
        super().__init__()
        hidden = int(cfg.width * cfg.mlp_ratio)
        self.norm1 = nn.LayerNorm(cfg.width, eps=LN_EPS)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=LN_EPS)
        self.mlp = nn.Sequential(nn.Linear(cfg.width, hidden), nn.GELU(), nn.Dropout(cfg.dropout),
                                 nn.Linear(hidden, cfg.width), nn.Dropout(cfg.dropout))

    def forward(self, x, bias, past_kv=None, keep: slice | None = None):
        h, present = self.attn(self.norm1(x), bias, past_kv, keep)
        x = (x if keep is None else x[:, keep]) + h
        return x + self.mlp(self.norm2(x)), present


def band_turn_index(turns: int, context_turns: int, attention: str = "band") -> torch.Tensor:
    """[T, T] long: bias-table column for query turn i and key turn j.

    band: d = i - j if 0 <= d < W else W (masked). full (ablation): |d| if |d| < W else W.
    """
    i = torch.arange(turns)[:, None]
    j = torch.arange(turns)[None, :]
    d = i - j
    if attention == "full":
        d = d.abs()
    allowed = (d >= 0) & (d < context_turns)
    return torch.where(allowed, d, torch.full_like(d, context_turns))


def frame_aligned_positions(frames: int, width: int) -> torch.Tensor:
    """Initial in-turn positions [P, D]: the four frame groups share a sinusoidal code of the
    frame index in half the channels, so "speech frame i <-> motion frame i" is easy to attend
    from the start (the embedding stays learned; only its initialisation is structured)."""
    pos = torch.zeros(4 * frames + 10, width)
    half = width // 4
    freqs = torch.exp(-torch.log(torch.tensor(50.0)) * torch.arange(half) / half)
    f = torch.arange(frames, dtype=torch.float32)[:, None] * freqs[None]
    code = torch.cat([torch.sin(f), torch.cos(f)], dim=1)                  # [F, D/2]
    for start, end in turn_layout(frames).values():
        pos[start:end, :2 * half] = code
    return pos


class Timar(nn.Module):
    def __init__(self, cfg: TimarConfig):
        super().__init__()
        self.cfg = cfg
        f, p, dt, d = cfg.frames_per_turn, cfg.tokens_per_turn, cfg.token_width, cfg.width
        if cfg.audio_encoder == "logmel":
            self.audio_encoder = LogMelEncoder(cfg.audio_dim, cfg.audio_channels, cfg.n_mels, cfg.sample_rate)
            audio_dim = cfg.audio_dim
        else:
            self.audio_encoder = Wav2Vec2Encoder(cfg.wav2vec2_path, f)
            audio_dim = self.audio_encoder.out_dim
        self.speech_proj = nn.Linear(audio_dim, dt)
        self.motion_enc = nn.Sequential(nn.Linear(MOTION_DIM, dt // 2), nn.ReLU(),
                                        nn.Linear(dt // 2, dt), nn.ReLU())
        self.special = nn.Parameter(torch.randn(10, dt) * 0.02)
        self.fake_latent = nn.Parameter(torch.randn(dt) * 0.02)     # CFG: unconditional user token
        self.absent_user_motion = nn.Parameter(torch.randn(dt) * 0.02)
        self.z_proj = nn.Linear(dt, d)
        self.mask_token = nn.Parameter(torch.randn(d) * 0.02)
        self.pos_embed = nn.Parameter(frame_aligned_positions(f, d) + torch.randn(p, d) * 0.02)
        self.z_proj_ln = nn.LayerNorm(d, eps=LN_EPS)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=LN_EPS)
        self.diffusion_pos_embed = nn.Parameter(torch.randn(p, d) * 0.02)
        if cfg.head == "diffusion":
            self.head = DiffusionHead(d, cfg.diff_width, cfg.diff_depth, cfg.diffusion_batch_mul,
                                      cfg.decoder_nll, cfg.bounded_variance)
        else:
            self.head = MLPHead(d)
        # Motion normalisation (identity until set from training data; saved with the weights).
        self.register_buffer("motion_mean", torch.zeros(MOTION_DIM))
        self.register_buffer("motion_std", torch.ones(MOTION_DIM))

        lay = turn_layout(f)
        self._agent = lay["agent_motion"]
        self.register_buffer("_special_pos", torch.tensor(special_token_positions(f)), persistent=False)
        self._init_linear()

    def _init_linear(self) -> None:
        modules = [self.speech_proj, self.motion_enc, self.z_proj, self.blocks]
        for m in (x for mod in modules for x in mod.modules()):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    # ---- helpers -------------------------------------------------------------------------
    def normalize(self, motion: torch.Tensor) -> torch.Tensor:
        return (motion - self.motion_mean) / self.motion_std

    def denormalize(self, motion: torch.Tensor) -> torch.Tensor:
        return motion * self.motion_std + self.motion_mean

    def encode_audio(self, wav: torch.Tensor) -> torch.Tensor:
        """[..., S] waveform per turn -> [..., F, Da] features."""
        lead = wav.shape[:-1]
        feats = self.audio_encoder(wav.reshape(-1, wav.shape[-1]))
        return feats.reshape(*lead, *feats.shape[1:])

    def embed_turns(self, user_feats, user_motion, agent_feats, agent_motion, agent_mask,
                    user_uncond, user_absent) -> torch.Tensor:
        """Input tokens of T turns -> [B, T*P, D] (after z_proj, mask token, positions, z_proj_ln).

        user_feats/agent_feats [B, T, F, Da]; user_motion/agent_motion [B, T, F, 56] normalised;
        agent_mask [B, T, F] (1 = to be generated -> mask token); user_uncond [B, T, 2F]
        (1 = user token replaced by the fake latent); user_absent [B, T] (1 = no user motion).
        Masks are float 0/1 so the exported graph has no boolean inputs.
        """
        b, t, f = agent_mask.shape
        user_mo = self.motion_enc(user_motion)
        absent = user_absent[..., None, None]
        user_mo = user_mo * (1 - absent) + self.absent_user_motion * absent
        user = torch.cat([self.speech_proj(user_feats), user_mo], dim=2)       # [B, T, 2F, Dt]
        unc = user_uncond[..., None]
        user = user * (1 - unc) + self.fake_latent * unc
        sp = self.special.expand(b, t, -1, -1)
        pieces = [sp[:, :, 0:2], user[:, :, :f], sp[:, :, 2:4], user[:, :, f:], sp[:, :, 4:6],
                  self.speech_proj(agent_feats), sp[:, :, 6:8], self.motion_enc(agent_motion),
                  sp[:, :, 8:10]]
        x = self.z_proj(torch.cat(pieces, dim=2))                               # [B, T, P, D]
        start, end = self._agent
        m = F.pad(agent_mask, (start, self.cfg.tokens_per_turn - end))[..., None]
        x = x * (1 - m) + self.mask_token * m
        x = self.z_proj_ln(x + self.pos_embed)
        return x.reshape(b, t * self.cfg.tokens_per_turn, -1)

    def _agent_outputs(self, h_agent: torch.Tensor) -> torch.Tensor:
        """Final norm + diffusion positions of the agent-motion tokens: [..., F, D] -> z [..., F, D]."""
        start, end = self._agent
        return self.norm(h_agent) + self.diffusion_pos_embed[start:end]

    # ---- the two forwards ----------------------------------------------------------------
    def forward_full(self, user_feats, user_motion, agent_feats, agent_motion, agent_mask,
                     user_uncond, user_absent) -> torch.Tensor:
        """All T turns at once with the band turn mask. Returns z [B, T, F, D]."""
        x = self.embed_turns(user_feats, user_motion, agent_feats, agent_motion, agent_mask,
                             user_uncond, user_absent)
        turns = agent_mask.shape[1]
        col = band_turn_index(turns, self.cfg.context_turns, self.cfg.attention).to(x.device)
        col = col.repeat_interleave(self.cfg.tokens_per_turn, 0).repeat_interleave(self.cfg.tokens_per_turn, 1)
        for block in self.blocks:
            bias = block.attn.bias_table()[:, col][None]                        # [1, H, N, N]
            x, _ = block(x, bias)
        start, end = self._agent
        return self._agent_outputs(x.reshape(x.shape[0], turns, self.cfg.tokens_per_turn, -1)[:, :, start:end])

    def forward_step(self, user_feats, user_motion, agent_feats, agent_motion, agent_mask,
                     user_uncond, user_absent, past_key_values, past_turn_age):
        """One turn against the cache.

        user_feats/agent_feats [B, F, Da]; user_motion/agent_motion [B, F, 56]; agent_mask [B, F];
        user_uncond [B], user_absent [B] (per-row flags, 0/1 float);
        past_key_values: per layer, the keys and values [2][B, H, (W-1)*P, hd] (a tensor
        [L, 2, B, H, (W-1)*P, hd] or a list of (key, value) pairs); past_turn_age [B, (W-1)*P] int64
        (1..W-1 filled, W empty). Returns z [B, F, D] and present_key_values [L, 2, B, H, P, hd].
        """
        if self.cfg.attention != "band":
            raise ValueError("forward_step: full attention is not turn-causal and cannot be cached")
        b = agent_mask.shape[0]
        p = self.cfg.tokens_per_turn
        uncond = user_uncond[:, None, None].expand(b, 1, 2 * self.cfg.frames_per_turn)
        x = self.embed_turns(user_feats[:, None], user_motion[:, None], agent_feats[:, None],
                             agent_motion[:, None], agent_mask[:, None], uncond, user_absent[:, None])
        ages = torch.cat([past_turn_age, torch.zeros_like(past_turn_age[:, :p])], dim=1)
        ages = ages.clamp(0, self.cfg.context_turns)
        start, end = self._agent
        presents = []
        for layer, block in enumerate(self.blocks):
            bias = block.attn.bias_table()[:, ages].transpose(0, 1)[:, :, None]   # [B, H, 1, M+P]
            # Only the agent-motion tokens' outputs are read after the last layer, so its queries,
            # projection and MLP run for those F tokens alone (its keys/values still cover all P).
            last = layer == len(self.blocks) - 1
            x, present = block(x, bias, past_key_values[layer], slice(start, end) if last else None)
            presents.append(present)
        return self._agent_outputs(x), torch.stack(presents)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
