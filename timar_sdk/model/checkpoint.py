"""Checkpoints: a plain dict of config, weights, EMA weights and motion statistics.

Everything in it is a tensor, number, string, list or dict, so `torch.load(weights_only=True)`
reads it without executing any pickled code.
"""
from __future__ import annotations

from pathlib import Path

import torch

from timar_sdk.model.config import TimarConfig
from timar_sdk.model.timar import Timar

FORMAT = "timar-sdk-checkpoint-v1"
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "assets" / "tiny_synthetic.pt"


def save_checkpoint(path: str | Path, model: Timar, ema: dict | None = None, **extra) -> None:
    """Write config + weights (+ EMA weights, optimizer state, step, ... in `extra`)."""
    ckpt = {"format": FORMAT, "config": model.cfg.to_dict(),
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "ema": ema, "motion_mean": model.motion_mean.cpu(), "motion_std": model.motion_std.cpu(),
            **extra}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)            # never leave a half-written checkpoint behind


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint dict, loaded with weights_only=True; clear errors for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt: no such file {str(path)!r}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several kinds for a bad pickle
        raise ValueError(f"ckpt: {path} is not a loadable weights-only checkpoint: {e}") from e
    check_format(ckpt, path)
    return ckpt


def check_format(ckpt: object, path: str | Path) -> None:
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"ckpt: {path} is not a timar-sdk checkpoint (expected format {FORMAT!r})")


def load_model(path: str | Path | dict = DEFAULT_CHECKPOINT, ema: bool = True, **config_overrides) -> Timar:
    """A Timar module in eval mode from a checkpoint path, or the dict `read_checkpoint` returned
    (EMA weights when present and `ema`)."""
    ckpt = path if isinstance(path, dict) else read_checkpoint(path)
    cfg = TimarConfig.from_dict({**ckpt["config"], **config_overrides})
    model = Timar(cfg)
    state = ckpt["ema"] if ema and ckpt.get("ema") else ckpt["model"]
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


def slim_checkpoint(src: str | Path, dst: str | Path) -> None:
    """A shippable copy: EMA weights only (as `model`), stored in float16, no optimizer state.
    Loading casts back to float32 (`load_model`)."""
    ckpt = read_checkpoint(src)
    state = ckpt["ema"] or ckpt["model"]
    keep = {k: v for k, v in ckpt.items() if k not in ("model", "ema", "optimizer")}
    keep["model"] = {k: v.half() if v.is_floating_point() and not k.startswith("motion_") else v
                     for k, v in state.items()}
    keep["ema"] = None
    torch.save(keep, dst)
