"""Checkpoints: a plain dict of config, weights, EMA weights and motion statistics.

Everything in it is a tensor, number, string, list or dict, so `torch.load(weights_only=True)`
reads it without executing any pickled code.
"""
from __future__ import annotations

import pickle
import re
import zipfile
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


TORCH_DATA = "tensors, dicts, lists, tuples, numbers and strings"


def load_weights_only(path: str | Path, safe_globals=(), allowed: str = TORCH_DATA) -> object:
    """`torch.load(path, weights_only=True)` with `safe_globals` allowed as well (callables, or
    (callable, "module.name") pairs for a name the callable is pickled under).

    Nothing in the file is executed. Any failure is one ValueError line that names the file and
    the problem: "corrupt or truncated file" when the file itself is damaged (empty, cut short,
    a zip member failing its CRC), the refused global's full name when it holds pickled objects
    other than data (`allowed` describes what may be in it), "not a PyTorch checkpoint" otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt: no such file {str(path)!r}")
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file
        with torch.serialization.safe_globals(list(safe_globals)):
            why = _why_unreadable(path, e, allowed)
        raise ValueError(f"ckpt: {path} {why}") from e


def _why_unreadable(path: Path, error: Exception, allowed: str) -> str:
    size = path.stat().st_size
    if size == 0:
        return "is a corrupt or truncated file: it is empty (0 bytes)"
    with open(path, "rb") as fh:
        head = fh.read(4)
    is_zip = head.startswith(b"PK\x03\x04")          # torch.save's format since torch 1.6
    if is_zip:
        damage = _zip_damage(path)
        if damage:
            return f"is a corrupt or truncated file ({size} bytes): {damage}"
    refused = _refused_globals(path, error, is_zip)
    if refused:
        which = (f"global {refused[0]}, which is" if len(refused) == 1
                 else f"globals {', '.join(refused)}, which are")
        return (f"was refused by the weights-only loader: it holds the pickled {which} not data "
                f"(allowed: {allowed}); nothing in it was executed")
    if not is_zip and not head.startswith(b"\x80"):     # a pickle of protocol 2+ starts with PROTO
        return (f"is not a PyTorch checkpoint: neither a torch.save zip archive nor a pickle "
                f"(it starts with {head!r})")
    reason = _reason(error)
    if not is_zip and (isinstance(error, EOFError) or re.search(r"truncated|EOF|corrupt", reason)):
        return f"is a corrupt or truncated file ({size} bytes): {reason}"
    hint = " (a plain pickle, not a torch.save file?)" if not is_zip and "Unsupported operand" in reason else ""
    return f"cannot be read by torch.load(weights_only=True): {reason}{hint}"


def _zip_damage(path: Path) -> str | None:
    """What is wrong with a zip archive's structure, or None when every member reads back intact."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except zipfile.BadZipFile:
        return "the zip archive's central directory is missing or damaged (cut short while saving or copying?)"
    except (OSError, EOFError, ValueError, RuntimeError) as e:
        return f"a zip member cannot be read ({type(e).__name__}: {_shorten(str(e))})"
    return f"the zip member {bad} fails its CRC check" if bad else None


def _refused_globals(path: Path, error: Exception, is_zip: bool) -> list[str]:
    """Full names of the pickled globals the weights-only loader does not allow (no code runs:
    the pickle is disassembled, not loaded). Call inside the same safe_globals context."""
    if not isinstance(error, pickle.UnpicklingError):
        return []
    names: list[str] = []
    try:
        if is_zip:
            names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        else:   # a plain or legacy pickle: disassemble it, compare with torch's allowlist
            from torch import _weights_only_unpickler as wou
            allowed = {**wou._get_allowed_globals(), **wou._get_user_allowed_globals()}
            with open(path, "rb") as fh:
                names = sorted({n for n in _pickle_globals(fh) if n not in allowed})
    except Exception:  # noqa: BLE001 - best effort; torch's own message is the fallback
        names = []
    return names or re.findall(r"GLOBAL ([\w.]+)", str(error))[:1]


def _pickle_globals(fh) -> list[str]:
    """Every global named in the pickle stream(s) at the start of `fh` (a legacy torch file holds
    five before its raw storage bytes): GLOBAL and INST, and STACK_GLOBAL with its two strings
    followed through the memo. Disassembly only: nothing is constructed."""
    import pickletools
    names: list[str] = []
    for _ in range(5):
        strings: list[str] = []
        memo: dict[int, str | None] = {}
        top = None
        try:
            for op, arg, _pos in pickletools.genops(fh):
                if op.name in ("GLOBAL", "INST"):
                    names.append(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
                if isinstance(arg, str) and ("UNICODE" in op.name or "STRING" in op.name):
                    top = arg
                    strings.append(arg)
                elif op.name == "MEMOIZE":
                    memo[len(memo)] = top
                elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[int(arg)] = top
                elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                    top = memo.get(int(arg))
                    if top is not None:
                        strings.append(top)
                else:
                    top = None
        except Exception:  # noqa: BLE001 - past the last pickle, or a damaged one: stop here
            break
    return names


def _reason(error: Exception) -> str:
    """torch's one informative line: the weights-only unpickler's own reason when there is one,
    else the first non-empty line; whole words only."""
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if "WeightsUnpickler error:" in ln:
            rest = ln.split("WeightsUnpickler error:", 1)[1].strip()
            return _shorten(rest or (lines[i + 1] if i + 1 < len(lines) else type(error).__name__))
    return _shorten(lines[0]) if lines else type(error).__name__


def _shorten(text: str, limit: int = 200) -> str:
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0].rstrip(" ,;:.") + " ..."


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint dict, loaded with weights_only=True; one clear line for anything else."""
    ckpt = load_weights_only(path)
    check_format(ckpt, path)
    return ckpt


def check_format(ckpt: object, path: str | Path) -> None:
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"ckpt: {path} is not a timar-sdk checkpoint (expected format {FORMAT!r})")


def load_model(path: str | Path | dict = DEFAULT_CHECKPOINT, ema: bool = True, **config_overrides) -> Timar:
    """A Timar module in eval mode from a checkpoint path, or the dict `read_checkpoint` returned
    (EMA weights when present and `ema`)."""
    if isinstance(path, dict):
        return model_from_checkpoint(path, "checkpoint", ema, **config_overrides)
    return model_from_checkpoint(read_checkpoint(path), path, ema, **config_overrides)


def model_from_checkpoint(ckpt: dict, path: str | Path, ema: bool = True, **config_overrides) -> Timar:
    """A Timar module in eval mode from a checkpoint dict read from `path` (named in errors).
    A missing part, an invalid config or weights that do not fit the config raise one ValueError
    line naming the file and what is wrong."""
    check_format(ckpt, path)
    config = ckpt.get("config")
    if not isinstance(config, dict):
        raise ValueError(f"ckpt: {path} has no 'config' dict (got {type(config).__name__})")
    try:
        cfg = TimarConfig.from_dict({**config, **config_overrides})
    except (ValueError, TypeError, ZeroDivisionError) as e:
        raise ValueError(f"ckpt: {path} has an invalid config: {_shorten(str(e))}") from e
    which = "ema" if ema and ckpt.get("ema") else "model"
    state = ckpt.get(which)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"ckpt: {path} has no '{which}' weights (a dict of tensors)")
    try:
        model = Timar(cfg)
    except (RuntimeError, ValueError, TypeError) as e:      # e.g. a negative width
        raise ValueError(f"ckpt: {path} has a config no model can be built from: {_reason(e)}") from e
    problem = state_dict_mismatch(model, state)
    if problem:
        raise ValueError(f"ckpt: {path}: the '{which}' weights do not fit its config "
                         f"({cfg.preset}, width {cfg.width}, depth {cfg.depth}): {problem}")
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


def state_dict_mismatch(model: torch.nn.Module, state: dict) -> str:
    """'' when `state` has exactly the model's keys and shapes; else the missing, unexpected and
    misshapen keys (a few of each, with counts)."""
    ours = model.state_dict()
    missing = sorted(set(ours) - set(state))
    unexpected = sorted(set(state) - set(ours))
    shapes = [f"{k} {tuple(state[k].shape)} (expected {tuple(ours[k].shape)})"
              for k in ours if k in state and tuple(state[k].shape) != tuple(ours[k].shape)]

    def few(items):
        return f"{', '.join(items[:3])}{' ...' if len(items) > 3 else ''} ({len(items)})"
    parts = ([f"missing {few(missing)}"] if missing else []) + \
            ([f"unexpected {few(unexpected)}"] if unexpected else []) + \
            ([f"wrong shape {few(shapes)}"] if shapes else [])
    return "; ".join(parts)


def read_resume_checkpoint(path: str | Path) -> dict:
    """A checkpoint `timar-train --resume` can continue from: readable, a timar-sdk checkpoint whose
    weights fit its config, with EMA weights, optimizer state and step. One ValueError line
    naming the file and the problem otherwise (a slimmed or shipped checkpoint has no optimizer)."""
    ckpt = read_checkpoint(path)
    model = model_from_checkpoint(ckpt, path, ema=False)
    for key, kind in (("ema", dict), ("optimizer", dict), ("step", int)):
        if not isinstance(ckpt.get(key), kind):
            raise ValueError(f"ckpt: {path} cannot be resumed: it has no '{key}' ({kind.__name__}); slimmed "
                             f"and shipped checkpoints keep only the weights; train from scratch instead")
    problem = state_dict_mismatch(model, ckpt["ema"])
    if problem:
        raise ValueError(f"ckpt: {path} cannot be resumed: the 'ema' weights do not fit its config: {problem}")
    return ckpt


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
