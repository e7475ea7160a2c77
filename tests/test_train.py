"""Training learns, checkpoints resume and load safely, the default checkpoint ships."""
import pickle

import pytest
import torch

from timar_sdk.model.checkpoint import DEFAULT_CHECKPOINT, load_model, read_checkpoint
from timar_sdk.model.config import preset
from timar_sdk.model.timar import Timar
from timar_sdk.train import TrainArgs, train

SMALL = dict(width=64, heads=4, token_width=64, audio_dim=32, audio_channels=16, diff_width=64,
             depth=2, context_turns=2)


def small_args(tmp_path, **kw):
    settings = dict(out=str(tmp_path / "ckpt.pt"), steps=250, batch_size=4, lr=2e-3, warmup=20,
                    val_every=250, save_every=250, synthetic_clips=6, synthetic_seconds=8.0,
                    turns_per_window=3, config_overrides=SMALL)
    return TrainArgs(**{**settings, **kw})


def test_training_lowers_validation_loss(tmp_path):
    torch.set_num_threads(2)
    result = train(small_args(tmp_path), progress=False)
    # A real learning check: the fixed validation windows' diffusion loss drops clearly.
    assert result["val_loss"] < 0.8 * result["val_loss_init"], result
    assert result["val_loss_ema"] < result["val_loss_init"], result
    model = load_model(tmp_path / "ckpt.pt")
    assert model.cfg.width == 64 and model.motion_std.min() > 0


def test_resume_continues_the_step_count(tmp_path):
    args = small_args(tmp_path, steps=2, val_every=1, save_every=1)
    train(args, progress=False)
    first = read_checkpoint(args.out)
    args.steps, args.resume = 4, args.out
    train(args, progress=False)
    second = read_checkpoint(args.out)
    assert first["step"] == 2 and second["step"] == 4
    assert [h[0] for h in second["val_history"]] == [0, 1, 2, 3, 4]


def test_checkpoint_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("open(%r, 'w').write('pwned')" % str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"format": "timar-sdk-checkpoint-v1", "x": Evil()}, fh)
    with pytest.raises(ValueError, match="weights-only"):
        read_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_missing_checkpoint_and_wav2vec2_dir_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="ckpt: no such file"):
        read_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="wav2vec2: expected a local Hugging Face wav2vec2 directory.*wav2vec2_path"):
        Timar(preset("tiny", audio_encoder="wav2vec2", wav2vec2_path=str(tmp_path / "missing")))


def test_presets_match_the_paper_sizes():
    assert (preset("base").width, preset("base").depth, preset("base").heads) == (768, 24, 12)
    assert (preset("large").width, preset("large").depth, preset("large").heads) == (1024, 32, 16)
    with pytest.raises(ValueError, match="preset"):
        preset("huge")


@pytest.mark.skipif(not DEFAULT_CHECKPOINT.exists(), reason="the default checkpoint is not built yet")
def test_shipped_checkpoint_loads():
    ckpt = read_checkpoint(DEFAULT_CHECKPOINT)
    model = load_model(DEFAULT_CHECKPOINT)
    assert model.cfg.preset == "tiny" and ckpt["val_loss_ema"] < ckpt["val_history"][0][1]
    assert DEFAULT_CHECKPOINT.stat().st_size < 15e6


@pytest.mark.slow
def test_torchrun_distributed_data_parallel(tmp_path):
    """Two processes under torchrun (gloo on the CPU) train and write one checkpoint."""
    import json
    import subprocess
    import sys

    code = (
        "import json, sys; from timar_sdk.train import TrainArgs, train; "
        f"r = train(TrainArgs(out={str(tmp_path / 'ddp.pt')!r}, steps=2, batch_size=2, warmup=1, "
        "val_every=2, save_every=2, synthetic_clips=2, synthetic_seconds=6.0, turns_per_window=3, "
        f"config_overrides={SMALL!r}), progress=False); print(json.dumps(r))"
    )
    script = tmp_path / "ddp_job.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29517", str(script)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_checkpoint(tmp_path / "ddp.pt")["step"] == 2
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 2          # both ranks finished
