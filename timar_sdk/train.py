"""Training loop for TIMAR (single process, or DistributedDataParallel under torchrun).

Each step: random windows of T > W consecutive turns; one MAR mask ratio per mini-batch from a
truncated normal on [0.7, 1.0] (mean 1.0, std 0.25); ceil(T*F*ratio) agent-motion tokens masked
per window; CFG dropout of user tokens (p=0.1 each) and whole-turn user-motion dropout (p=0.2);
the head's loss on the masked tokens. AdamW, linear warmup then cosine decay, gradient clipping,
EMA of the weights, checkpoint/resume.
"""
from __future__ import annotations

import copy
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from timar_sdk.data.dualtalk import WindowDataset, compute_motion_stats, list_examples, load_example
from timar_sdk.data.synthetic import write_synthetic_corpus
from timar_sdk.model.checkpoint import read_checkpoint, save_checkpoint
from timar_sdk.model.config import TimarConfig, preset
from timar_sdk.model.timar import Timar


@dataclass
class TrainArgs:
    data: str = "synthetic"          # a DualTalk-format folder with train/ (and val/), or "synthetic"
    preset: str = "tiny"
    out: str = "ckpt.pt"
    steps: int = 1000
    batch_size: int = 4
    turns_per_window: int | None = None   # default: context_turns + 2
    lr: float = 3e-4
    weight_decay: float = 0.02
    warmup: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    gain_db: float = 6.0             # random audio gain augmentation, +- dB
    val_every: int = 200
    save_every: int = 100
    seed: int = 0
    device: str = "auto"
    synthetic_clips: int = 48        # --data synthetic: train clips (val gets a quarter)
    synthetic_seconds: float = 20.0
    resume: str | None = None
    history: str | None = None       # override the preset's history mode
    head: str | None = None          # override: "diffusion" | "mlp" (ablation)
    attention: str | None = None     # override: "band" | "full" (ablation)
    diffusion_batch_mul: int | None = None   # override: repeats of each token in the loss
    config_overrides: dict | None = None      # any other TimarConfig fields (tests, experiments)


def truncated_normal_ratio(rng: np.random.Generator, low=0.7, high=1.0, mean=1.0, std=0.25) -> float:
    while True:
        r = rng.normal(mean, std)
        if low <= r <= high:
            return float(r)


def load_split(root: Path, split: str, cfg: TimarConfig) -> list[dict]:
    folder = root / split
    if not folder.is_dir():
        return []
    return [load_example(e, cfg.sample_rate, cfg.fps, cfg.frames_per_turn) for e in list_examples(folder)]


def make_batch(items: list[dict], model: Timar, rng: np.random.Generator, device, train: bool,
               gain_db: float = 0.0) -> dict[str, torch.Tensor]:
    """Stack windows into model inputs: normalised motion, masks and dropout flags."""
    cfg = model.cfg
    b = len(items)
    t, f = items[0]["agent_motion"].shape[:2]
    stack = {k: torch.from_numpy(np.stack([it[k] for it in items])).to(device) for k in items[0]}
    if train and gain_db:
        gain = 10 ** (rng.uniform(-gain_db, gain_db, size=(b, 2, 1, 1)) / 20)
        stack["user_audio"] = stack["user_audio"] * torch.from_numpy(gain[:, 0]).float().to(device)
        stack["agent_audio"] = stack["agent_audio"] * torch.from_numpy(gain[:, 1]).float().to(device)
    n_tok = t * f
    if train:
        n_mask = math.ceil(n_tok * truncated_normal_ratio(rng))
        mask = np.zeros((b, n_tok), np.float32)
        for i in range(b):
            mask[i, rng.permutation(n_tok)[:n_mask]] = 1.0
        uncond = (rng.random((b, t, 2 * f)) < cfg.cfg_drop_prob).astype(np.float32)
        absent = (rng.random((b, t)) < cfg.absent_prob).astype(np.float32)
    else:       # validation: the inference setting, everything masked, all conditions present
        mask = np.ones((b, n_tok), np.float32)
        uncond = np.zeros((b, t, 2 * f), np.float32)
        absent = np.zeros((b, t), np.float32)
    as_t = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    return {"user_audio": stack["user_audio"], "agent_audio": stack["agent_audio"],
            "user_motion": model.normalize(stack["user_motion"]),
            "agent_motion": model.normalize(stack["agent_motion"]),
            "agent_mask": as_t(mask.reshape(b, t, f)), "user_uncond": as_t(uncond),
            "user_absent": as_t(absent)}


def batch_loss(model: Timar, batch: dict[str, torch.Tensor], runner=None) -> torch.Tensor:
    """Mean head loss over the masked agent-motion tokens of the batch. `runner` is the DDP
    wrapper when distributed (its forward runs the model, so gradients are synchronised)."""
    z = runner(batch) if runner is not None else _forward(model, batch)
    mask = batch["agent_mask"].reshape(-1) > 0.5
    z = z.reshape(-1, z.shape[-1])[mask]
    target = batch["agent_motion"].reshape(-1, batch["agent_motion"].shape[-1])[mask]
    return model.head.loss(z, target).mean()


def _forward(model: Timar, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model.forward_full(
        model.encode_audio(batch["user_audio"]), batch["user_motion"],
        model.encode_audio(batch["agent_audio"]), batch["agent_motion"],
        batch["agent_mask"], batch["user_uncond"], batch["user_absent"])


class _DDPWrapper(torch.nn.Module):
    """DDP needs forward() to run the whole model; this maps forward() to `_forward`."""

    def __init__(self, model: Timar):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return _forward(self.model, batch)


@torch.no_grad()
def validation_loss(model: Timar, windows: WindowDataset, device, seed: int = 1234,
                    batch_size: int = 4, max_windows: int = 32) -> float:
    """Mean diffusion loss on fixed validation windows with fixed t/noise draws (comparable
    across steps and runs)."""
    was_training = model.training
    model.eval()
    rng = np.random.default_rng(seed)
    n = min(len(windows), max_windows)
    losses = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, n, batch_size):
            items = [windows[i] for i in range(start, min(n, start + batch_size))]
            losses.append(batch_loss(model, make_batch(items, model, rng, device, train=False)).item())
    model.train(was_training)
    return float(np.mean(losses))


def ema_update(ema: dict[str, torch.Tensor], model: Timar, decay: float) -> None:
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
        else:
            ema[k].copy_(v)


def lr_at(step: int, args: TrainArgs) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(args: TrainArgs, progress: bool = True) -> dict:
    """Train and write `args.out`; returns {"val_loss_init", "val_loss", "steps", "seconds"}."""
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = 0
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank = dist.get_rank()
    if args.device == "auto":
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)

    resume = read_checkpoint(args.resume) if args.resume else None
    if resume:
        cfg = TimarConfig.from_dict(resume["config"])
    else:
        overrides = {k: getattr(args, k) for k in ("history", "head", "attention", "diffusion_batch_mul")
                     if getattr(args, k)}
        cfg = preset(args.preset, **overrides, **(args.config_overrides or {}))
    torch.manual_seed(args.seed + rank)
    rng = np.random.default_rng([args.seed, rank])

    tmp = None
    if args.data == "synthetic":
        tmp = tempfile.TemporaryDirectory(prefix="timar-synthetic-")
        root = write_synthetic_corpus(tmp.name, 0, seconds=args.synthetic_seconds, seed=args.seed,
                                      splits={"train": args.synthetic_clips,
                                              "val": max(2, args.synthetic_clips // 4)})
    else:
        root = Path(args.data)
    train_ex = load_split(root, "train", cfg)
    val_ex = load_split(root, "val", cfg) or load_split(root, "ood", cfg)
    if not train_ex:
        raise ValueError(f"data: no examples under {root / 'train'} (expected the DualTalk format)")
    turns = args.turns_per_window or cfg.context_turns + 2
    train_windows = WindowDataset(train_ex, turns, stride_turns=1, normalize_audio=False)
    val_windows = WindowDataset(val_ex or train_ex[:4], turns, normalize_audio=False)
    if len(train_windows) == 0:
        raise ValueError(f"data: no example is {turns} turns long (turns_per_window)")

    model = Timar(cfg).to(device)
    if resume:
        model.load_state_dict(resume["model"])
        mean, std = resume["motion_mean"], resume["motion_std"]
    else:
        mean, std = map(torch.from_numpy, compute_motion_stats(train_ex))
    model.motion_mean.copy_(mean)
    model.motion_std.copy_(std)
    ema = copy.deepcopy(resume["ema"]) if resume else {k: v.detach().clone() for k, v in model.state_dict().items()}
    ema = {k: v.to(device) for k, v in ema.items()}
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    step = 0
    history = []
    if resume:
        opt.load_state_dict(resume["optimizer"])
        step = int(resume["step"])
        history = list(resume.get("val_history", []))
    runner = None
    if distributed:
        runner = torch.nn.parallel.DistributedDataParallel(
            _DDPWrapper(model), device_ids=[device.index] if device.type == "cuda" else None)

    val_init = history[0][1] if history else validation_loss(model, val_windows, device)
    if not history:
        history.append((0, val_init))
    t0 = time.time()
    bar = tqdm(total=args.steps, initial=step, disable=not progress or rank != 0, desc="train")
    model.train()
    while step < args.steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        items = [train_windows[i] for i in rng.integers(0, len(train_windows), args.batch_size)]
        batch = make_batch(items, model, rng, device, train=True, gain_db=args.gain_db)
        loss = batch_loss(model, batch, runner)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        step += 1
        ema_update(ema, model, min(args.ema_decay, (1 + step) / (10 + step)))
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        last = step == args.steps
        if rank == 0 and (step % args.val_every == 0 or last):
            history.append((step, validation_loss(model, val_windows, device)))
            bar.write(f"step {step}: validation loss {history[-1][1]:.4f}")
        if rank == 0 and (step % args.save_every == 0 or last):
            save_checkpoint(args.out, model, ema=ema, optimizer=opt.state_dict(), step=step,
                            val_history=[list(h) for h in history], train_args=asdict(args))
    bar.close()
    # Validation loss of the EMA weights, which are what export ships.
    ema_model = Timar(cfg).to(device)
    ema_model.load_state_dict(ema)
    val_ema = validation_loss(ema_model, val_windows, device)
    if rank == 0:
        save_checkpoint(args.out, model, ema=ema, optimizer=opt.state_dict(), step=step,
                        val_history=[list(h) for h in history], val_loss_ema=val_ema,
                        train_args=asdict(args))
    if distributed:
        dist.destroy_process_group()
    if tmp:
        tmp.cleanup()
    return {"val_loss_init": val_init, "val_loss": history[-1][1], "val_loss_ema": val_ema,
            "steps": step, "seconds": time.time() - t0}
