"""TIMAR model configuration: one dataclass and the named size presets (torch-free)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from timar_sdk.layout import FPS, SAMPLE_RATE, tokens_per_turn


@dataclass(frozen=True)
class TimarConfig:
    preset: str = "tiny"
    # backbone (encoder-only transformer)
    width: int = 256              # backbone width D
    depth: int = 4                # transformer blocks
    heads: int = 4
    mlp_ratio: float = 4.0
    token_width: int = 256        # token embedding width before z_proj (1024 in the paper)
    dropout: float = 0.1          # attention, projection and MLP dropout in training
    attention: str = "band"       # "band" (turn-causal, the SDK) | "full" (bidirectional ablation)
    context_turns: int = 8        # W: a turn attends turns i-W+1 .. i
    history: str = "masked"       # "masked" (paper) | "feedback" (generated motion written back)
    # motion head
    head: str = "diffusion"       # "diffusion" | "mlp" (regression ablation)
    diff_width: int = 256
    diff_depth: int = 3
    diffusion_batch_mul: int = 4
    # t = 0 term of the variational bound: "gaussian" (continuous; SDK models, whose normalised
    # motion is not confined to [-1, 1]) or "discretized" (ADM's 8-bit likelihood, as the authors).
    # The discretised one pushes the variance output far out of [-1, 1] on such data, and the
    # respaced sampler then extrapolates the log-variance (see MODEL_CARD.md).
    decoder_nll: str = "gaussian"
    bounded_variance: bool = True  # tanh on the variance channels (see Denoiser); authors': False
    # audio encoder
    audio_encoder: str = "logmel"  # "logmel" (ships) | "wav2vec2" (local Hugging Face directory)
    wav2vec2_path: str | None = None
    audio_dim: int = 256          # speech feature width Da
    audio_channels: int = 128     # hidden channels of the log-mel Conv1d stack
    n_mels: int = 80
    # conversation format
    fps: int = FPS
    sample_rate: int = SAMPLE_RATE
    frames_per_turn: int = 25
    # training-time conditioning dropout
    cfg_drop_prob: float = 0.1    # per user token -> fake latent
    absent_prob: float = 0.2      # per turn: user motion -> "absent" embedding
    # sampling defaults (the manifest carries them)
    steps: int = 5
    temperature: float = 1.0
    cfg: float = 1.0

    def __post_init__(self) -> None:
        checks = {
            "attention": self.attention in ("band", "full"),
            "history": self.history in ("masked", "feedback"),
            "head": self.head in ("diffusion", "mlp"),
            "decoder_nll": self.decoder_nll in ("gaussian", "discretized"),
            "audio_encoder": self.audio_encoder in ("logmel", "wav2vec2"),
            "heads": self.width % self.heads == 0,
            "context_turns": self.context_turns >= 1,
            "frames_per_turn": self.sample_rate % self.fps == 0 and self.frames_per_turn >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"TimarConfig.{name}: invalid value {getattr(self, name)!r}")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def tokens_per_turn(self) -> int:
        return tokens_per_turn(self.frames_per_turn)

    @property
    def samples_per_turn(self) -> int:
        return self.frames_per_turn * self.sample_rate // self.fps

    @property
    def cache_tokens(self) -> int:
        """Key/value slots of the past cache: (W - 1) turns."""
        return (self.context_turns - 1) * self.tokens_per_turn

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TimarConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"config: unknown keys {sorted(unknown)}")
        return cls(**d)


PRESETS = {
    # tiny ships: trained on CPU in about an hour, so no dropout (see MODEL_CARD.md).
    "tiny": TimarConfig(dropout=0.0),
    "base": TimarConfig(preset="base", width=768, depth=24, heads=12, token_width=1024,
                        diff_width=1024, audio_dim=1024, audio_channels=256),
    "large": TimarConfig(preset="large", width=1024, depth=32, heads=16, token_width=1024,
                         diff_width=1024, audio_dim=1024, audio_channels=256),
}


def preset(name: str, **overrides) -> TimarConfig:
    """A named preset (tiny, base, large) with optional field overrides."""
    if name not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {name!r}")
    return replace(PRESETS[name], **overrides)
