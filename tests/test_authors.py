"""The authors' checkpoint (issue 8): import, window-recompute export, and the runtime on it.

The real TIMAR.pth cannot be downloaded here; these tests use a state dict with the authors' key
names and shapes for timar_base (random values, tests/authors_fixture.py) and a small random
wav2vec2 saved with save_pretrained.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402

from authors_fixture import (THEIR_MODELS, authors_state_shapes, random_state, their_args,  # noqa: E402
                             write_authors_checkpoint, write_small_wav2vec2)
from timar_sdk.cli import export_cmd  # noqa: E402
from timar_sdk.model.authors import WindowReference, load_authors_model  # noqa: E402
from timar_sdk.runtime.rng import PhiloxNormal  # noqa: E402
from timar_sdk.runtime.session import Session, TimarInputError  # noqa: E402

W2V_HIDDEN = 32


@pytest.fixture(scope="module")
def authors(tmp_path_factory):
    """timar_base in the authors' format, a small wav2vec2, and the bundle timar-export made."""
    d = tmp_path_factory.mktemp("authors")
    w2v = write_small_wav2vec2(d / "wav2vec2", W2V_HIDDEN)
    ckpt = write_authors_checkpoint(d / "TIMAR.pth", "timar_base", speech_dim=W2V_HIDDEN)
    result = CliRunner().invoke(export_cmd, ["--ckpt", str(ckpt), "--wav2vec2", str(w2v), "--out", str(d / "bundle")])
    assert result.exit_code == 0, result.output
    return {"dir": d, "w2v": w2v, "ckpt": ckpt, "bundle": d / "bundle"}


def _turns(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for k in range(n):
        # Speech-like levels that change from turn to turn, and one untracked user every 4 turns.
        ua = (rng.standard_normal(16000) * 0.1 * (1 + k % 3)).astype(np.float32)
        aa = (rng.standard_normal(16000) * 0.05).astype(np.float32)
        um = None if k % 4 == 3 else (rng.standard_normal((25, 56)) * 0.1).astype(np.float32)
        yield ua, um, aa


def test_export_writes_a_window_recompute_bundle(authors):
    m = json.loads((authors["bundle"] / "manifest.json").read_text())
    assert m["attention"] == "window_recompute"
    assert set(m["graphs"]) == {"audio_encoder", "token_embed", "window_encoder", "denoiser"}
    assert m["window"] == {"tokens_per_turn": 110, "max_turns": 8, "token_dim": 768}
    assert m["model"]["preset"] == "timar_base" and m["model"]["depth"] == 24
    their_count = sum(int(np.prod(s)) for s in authors_state_shapes(768, 24, speech_dim=W2V_HIDDEN).values())
    assert m["model"]["num_params"] == their_count          # every parameter of theirs, nothing else
    assert m["audio_normalization"]["mode"] == "running"
    tokens = next(t for t in m["graphs"]["window_encoder"]["inputs"] if t["name"] == "tokens")
    assert isinstance(tokens["shape"][1], str)           # dynamic window length
    assert m["source_weights"] == "ema"


def test_onnx_runtime_matches_the_imported_torch_model_for_12_turns(authors):
    """Turn by turn, same noise: the window fills (turns 1..8) and then slides (9..12)."""
    model = load_authors_model(authors["ckpt"], str(authors["w2v"]))
    reference = WindowReference(model, PhiloxNormal(7))
    session = Session(authors["bundle"], backend="onnxruntime", seed=7)
    for k, (ua, um, aa) in enumerate(_turns(12)):
        want = reference.step(ua, um, aa)
        got = session.step(ua, um, aa)
        assert got.shape == (25, 56)
        assert np.abs(got - want).max() < 1e-3, f"turn {k}"
    assert session.turns == 12
    assert session.info["attention"] == "window_recompute" and session.info["model_preset"] == "timar_base"


def test_import_uses_the_ema_weights_and_refuses_other_checkpoints(authors):
    ckpt = torch.load(authors["ckpt"], weights_only=False)
    ema = load_authors_model(authors["ckpt"], str(authors["w2v"]))
    raw = load_authors_model(authors["ckpt"], str(authors["w2v"]), ema=False)
    assert torch.equal(ema.z_proj.weight, ckpt["model_ema"]["z_proj.weight"])
    assert torch.equal(raw.z_proj.weight, ckpt["model"]["z_proj.weight"])
    assert torch.equal(ema.special, ckpt["model_ema"]["sep_tok_emb.weight"])


def test_window_session_state_and_torch_backend(authors):
    turns = list(_turns(5, seed=3))
    session = Session(authors["bundle"], backend="onnxruntime", seed=1)
    for t in turns[:3]:
        session.step(*t)
    state = session.get_state()
    first = [session.step(*t) for t in turns[3:]]
    session.set_state(state)
    again = [session.step(*t) for t in turns[3:]]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))

    # A bad turn in between changes nothing.
    session.set_state(state)
    with pytest.raises(TimarInputError, match="user_audio"):
        session.step(np.zeros(100, np.float32), None, turns[3][2])
    assert np.array_equal(session.step(*turns[3]), first[0])

    reference = Session(authors["bundle"], backend="torch", seed=1)
    fresh = Session(authors["bundle"], backend="onnxruntime", seed=1)
    for t in turns[:2]:
        assert np.abs(reference.step(*t) - fresh.step(*t)).max() < 1e-3

    with pytest.raises(TimarInputError, match="history"):
        Session(authors["bundle"], history="feedback")


# ---- refusals ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_state():
    width, blocks, _ = THEIR_MODELS["timar_base"]
    return random_state(authors_state_shapes(width, blocks, speech_dim=W2V_HIDDEN))


def _load(state, w2v, **args):
    name = args.pop("model", "timar_base")
    return load_authors_model({"model": state, "args": their_args(name, W2V_HIDDEN, **args)}, str(w2v), ema=False)


def test_missing_unexpected_and_misshapen_keys_are_named(authors, base_state):
    w2v = authors["w2v"]
    missing = {k: v for k, v in base_state.items() if k != "encoder_blocks.3.attn.proj.weight"}
    with pytest.raises(ValueError, match=r"missing \['encoder_blocks.3.attn.proj.weight'\]"):
        _load(missing, w2v)
    with pytest.raises(ValueError, match=r"unexpected \['encoder_blocks.24.norm1.weight'\]"):
        _load({**base_state, "encoder_blocks.24.norm1.weight": torch.ones(768)}, w2v)
    with pytest.raises(ValueError, match=r"z_proj.weight has shape \(768, 512\), expected \(768, 1024\)"):
        _load({**base_state, "z_proj.weight": torch.zeros(768, 512)}, w2v)
    # The wrong width for the named model (timar_large's blocks are 1024 wide).
    with pytest.raises(ValueError, match=r"timar_large expects encoder_blocks.0.attn.qkv.weight of shape \(3072, 1024\)"):
        _load(base_state, w2v, model="timar_large")


def test_unsupported_variants_are_refused(authors, base_state):
    w2v = authors["w2v"]
    with pytest.raises(ValueError, match="full-attention"):
        _load(base_state, w2v, use_causal_attn=False)
    with pytest.raises(ValueError, match="encoder-decoder"):
        _load({**base_state, "decoder_embed.weight": torch.zeros(768, 768)}, w2v)
    no_diff = {k: v for k, v in base_state.items() if not k.startswith("diffloss.")}
    with pytest.raises(ValueError, match="MLP-head"):
        _load({**no_diff, "mlp_head.0.weight": torch.zeros(384, 768)}, w2v, use_mseloss=True)
    with pytest.raises(ValueError, match="do_norm"):
        _load(base_state, w2v, do_norm=True)


def test_missing_or_mismatched_wav2vec2_is_explained(authors, base_state, tmp_path):
    with pytest.raises(FileNotFoundError, match="wav2vec2-large-960h-lv60-self"):
        _load(base_state, tmp_path / "nowhere")
    other = write_small_wav2vec2(tmp_path / "w2v48", hidden=48)
    with pytest.raises(ValueError, match="hidden size 48.*expects 32"):
        _load(base_state, other)
    result = CliRunner().invoke(export_cmd, ["--ckpt", str(authors["ckpt"]), "--out", str(tmp_path / "b")])
    assert result.exit_code != 0
    assert "--wav2vec2 DIR is required" in result.output and "lv60-self" in result.output
    assert not (tmp_path / "b").exists()


class _WritesAFile:
    """A pickled object whose unpickling would create a file (stands in for arbitrary code)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_objects_other_than_data_are_refused_unexecuted(authors, tmp_path):
    marker = tmp_path / "executed"
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"encoder_blocks.0.norm1.weight": torch.ones(2)}, "args": _WritesAFile(marker)}, evil)
    result = CliRunner().invoke(export_cmd, ["--ckpt", str(evil), "--wav2vec2", str(authors["w2v"]),
                                             "--out", str(tmp_path / "b")])
    assert result.exit_code != 0
    assert "refused by the weights-only loader" in result.output
    assert not marker.exists()
    # argparse.Namespace and numpy arrays (their args hold the motion mean/std) are allowed.
    ok = tmp_path / "ok.pth"
    torch.save({"args": argparse.Namespace(mean=np.zeros(56, np.float32)), "model": {}}, ok)
    from timar_sdk.model.authors import read_authors_checkpoint
    assert read_authors_checkpoint(ok)["args"].mean.shape == (56,)
