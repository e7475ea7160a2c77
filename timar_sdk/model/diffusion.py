"""The per-token motion heads: the AdaLN-MLP diffusion denoiser with its training loss (ADM
conventions, docs/DESIGN.md section 1), and the MLP regression head of the paper's ablation.

Sampling lives in `timar_sdk.sampler` (numpy) so every backend shares it.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from timar_sdk.layout import EXP, JAW, MOTION_DIM, NECK
from timar_sdk.sampler import NUM_TRAIN_STEPS, cosine_alphas_cumprod, make_schedule

LN_EPS = 1e-6


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """t [N] (original timestep index, float) -> [N, width] via [cos, sin] features + MLP."""

    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        half = freq_dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(10000.0) * torch.arange(half) / half),
                             persistent=False)
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t.float()[:, None] * self.freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.width = width     # split(width) rather than chunk(3): a constant Split in ONNX
        self.in_ln = nn.LayerNorm(width, eps=LN_EPS)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN(y).split(self.width, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.width = width
        self.norm = nn.LayerNorm(width, eps=LN_EPS, elementwise_affine=False)
        self.linear = nn.Linear(width, out_dim)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN(y).split(self.width, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class Denoiser(nn.Module):
    """SimpleMLPAdaLN: (x_t [N, 56], t [N], z [N, cond_dim]) -> [N, 112] = x0 (56) + variance (56).

    bounded_variance: pass the variance channels through tanh, so the learned-range fraction
    (v + 1) / 2 stays in [0, 1]. SDK models use it: an unbounded v drifts far outside [-1, 1]
    where the 1000-step range is narrow (small t), and the respaced sampler then extrapolates
    the log-variance to huge values. The authors' head is unbounded (False).
    """

    def __init__(self, cond_dim: int, width: int, depth: int, bounded_variance: bool = False):
        super().__init__()
        self.bounded_variance = bounded_variance
        self.input_proj = nn.Linear(MOTION_DIM, width)
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final = FinalLayer(width, 2 * MOTION_DIM)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.time_embed.mlp:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        for block in self.blocks:     # zero-init adaLN: every block starts as the identity
            nn.init.zeros_(block.adaLN[-1].weight)
            nn.init.zeros_(block.adaLN[-1].bias)
        for m in (self.final.adaLN[-1], self.final.linear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = self.input_proj(x)
        y = self.time_embed(t) + self.cond_embed(z)
        for block in self.blocks:
            h = block(h, y)
        out = self.final(h, y)
        if self.bounded_variance:
            out = torch.cat([out[:, :MOTION_DIM], torch.tanh(out[:, MOTION_DIM:])], dim=-1)
        return out


def grouped_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[N] = mean over expression dims + mean over jaw dims + mean over neck dims (authors' loss)."""
    err = (pred - target) ** 2
    return err[:, EXP].mean(-1) + err[:, JAW].mean(-1) + err[:, NECK].mean(-1)


def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _gaussian_log_likelihood(x, mean, log_var):
    return -0.5 * (math.log(2 * math.pi) + log_var + (x - mean) ** 2 * torch.exp(-log_var))


def _discretized_gaussian_log_likelihood(x, mean, log_scale):
    """ADM's decoder likelihood for data assumed in [-1, 1] with 256 bins."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class DiffusionHead(nn.Module):
    """The denoiser plus the 1000-step training process (cosine schedule, learned-range variance)."""

    def __init__(self, cond_dim: int, width: int, depth: int, batch_mul: int = 4,
                 decoder_nll: str = "gaussian", bounded_variance: bool = True):
        super().__init__()
        self.net = Denoiser(cond_dim, width, depth, bounded_variance)
        self.batch_mul = batch_mul
        self.decoder_nll = decoder_nll
        self.schedule = cosine_alphas_cumprod(NUM_TRAIN_STEPS)   # float64 [T]: manifests and samplers
        sched = make_schedule(self.schedule)
        for name in ("alphas_cumprod", "log_beta", "log_post_var", "coef_x0", "coef_xt"):
            self.register_buffer(name, torch.tensor(getattr(sched, name), dtype=torch.float32),
                                 persistent=False)

    def loss(self, z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-token loss [N]: grouped x0 MSE + variational bound in bits, averaged over the
        `batch_mul` repeats (independent t and noise). z [N, Dz], target [N, 56] normalised motion."""
        n = z.shape[0]
        z = z.repeat(self.batch_mul, 1)
        x0 = target.repeat(self.batch_mul, 1)
        t = torch.randint(0, NUM_TRAIN_STEPS, (x0.shape[0],), device=z.device)
        noise = torch.randn_like(x0)
        ac = self.alphas_cumprod[t][:, None]
        x_t = ac.sqrt() * x0 + (1 - ac).sqrt() * noise
        out = self.net(x_t, t, z)
        pred_x0, v = out[:, :MOTION_DIM], out[:, MOTION_DIM:]
        mse = grouped_mse(pred_x0, x0)

        # Variational bound with the mean detached: it trains only the variance.
        c0, ct = self.coef_x0[t][:, None], self.coef_xt[t][:, None]
        frac = (v + 1) / 2
        model_log_var = frac * self.log_beta[t][:, None] + (1 - frac) * self.log_post_var[t][:, None]
        model_mean = c0 * pred_x0.detach() + ct * x_t
        true_mean = c0 * x0 + ct * x_t
        kl = _normal_kl(true_mean, self.log_post_var[t][:, None], model_mean, model_log_var)
        kl = kl.mean(-1) / math.log(2.0)
        if self.decoder_nll == "discretized":     # ADM's 8-bit image likelihood (the authors')
            nll = -_discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)
        else:   # normalised motion is continuous and not confined to [-1, 1]
            nll = -_gaussian_log_likelihood(x0, model_mean, model_log_var)
        nll = nll.mean(-1) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        return (mse + vb).reshape(self.batch_mul, n).mean(0)


class MLPHead(nn.Module):
    """Regression ablation: Linear(D, D/2) -> GELU -> Linear(D/2, 56), trained with grouped MSE."""

    def __init__(self, cond_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(cond_dim, cond_dim // 2), nn.GELU(),
                                 nn.Linear(cond_dim // 2, MOTION_DIM))

    def loss(self, z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return grouped_mse(self.net(z), target)


def numpy_denoiser(net: Denoiser):
    """Wrap a torch denoiser as the numpy `denoise(x, t, z)` function the sampler calls."""
    device = next(net.parameters()).device

    def denoise(x: np.ndarray, t: np.ndarray, z: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = net(*(torch.from_numpy(a).to(device) for a in (x, t, z)))
        return out.cpu().numpy()
    return denoise
