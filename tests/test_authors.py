"""The authors' checkpoint (issue 8): import, window-recompute export, and the runtime on it.

The real TIMAR.pth cannot be downloaded here; these tests use a state dict with the authors' key
names and shapes (random values, tests/authors_fixture.py) and a small random wav2vec2 saved with
save_pretrained. Every test that needs a model runs on a small one in the same format
("timar_test", registered in AUTHORS_PRESETS for this module) and, under the `heavy` marker
(more than 4 GB; `-m heavy` or `-m ""`), on timar_base. Expected sizes come from the fixture's tables.
"""
from __future__ import annotations

import argparse
import json
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402

from authors_fixture import (SMALL_MODELS, THEIR_MODELS, model_args, model_dims, model_state_shapes,  # noqa: E402
                             random_state, write_authors_checkpoint, write_small_wav2vec2)
from timar_sdk.cli import export_cmd  # noqa: E402
from timar_sdk.model import authors as authors_module  # noqa: E402
from timar_sdk.model.authors import load_authors_model  # noqa: E402
from timar_sdk.model.full_forward import full_forward_motion  # noqa: E402
from timar_sdk.runtime.rng import PhiloxNormal  # noqa: E402
from timar_sdk.runtime.model import Model  # noqa: E402
from timar_sdk.runtime.session import Session, TimarInputError, step_many  # noqa: E402

W2V_HIDDEN = 32


@pytest.fixture(scope="module", params=[*SMALL_MODELS, pytest.param("timar_base", marks=pytest.mark.heavy)])
def preset(request):
    """The model under test: its name (the checkpoint's args.model) and sizes (model_dims). A
    test-only model is registered in the importer's AUTHORS_PRESETS while the module's tests run on
    it, so the real import, export and runtime code runs on it unchanged."""
    name = request.param
    with pytest.MonkeyPatch.context() as mp:
        if name in SMALL_MODELS:
            assert name not in authors_module.AUTHORS_PRESETS
            mp.setitem(authors_module.AUTHORS_PRESETS, name, SMALL_MODELS[name])
        yield {"name": name, **model_dims(name)}


@pytest.fixture(scope="module")
def authors(preset, tmp_path_factory):
    """The model in the authors' format, a small wav2vec2, and the bundle timar-export made."""
    d = tmp_path_factory.mktemp("authors")
    w2v = write_small_wav2vec2(d / "wav2vec2", W2V_HIDDEN)
    ckpt = write_authors_checkpoint(d / "TIMAR.pth", preset["name"], speech_dim=W2V_HIDDEN)
    result = CliRunner().invoke(export_cmd, ["--ckpt", str(ckpt), "--wav2vec2", str(w2v), "--out", str(d / "bundle")])
    assert result.exit_code == 0, result.output
    return {"dir": d, "w2v": w2v, "ckpt": ckpt, "bundle": d / "bundle", **preset}


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
    assert m["window"] == {"tokens_per_turn": 110, "max_turns": 8, "token_dim": authors["width"]}
    assert m["model"]["preset"] == authors["name"] and m["model"]["depth"] == authors["blocks"]
    their_count = sum(int(np.prod(s)) for s in model_state_shapes(authors["name"], W2V_HIDDEN).values())
    assert m["model"]["num_params"] == their_count          # every parameter of theirs, nothing else
    assert m["audio_normalization"]["mode"] == "running"
    tokens = next(t for t in m["graphs"]["window_encoder"]["inputs"] if t["name"] == "tokens")
    assert isinstance(tokens["shape"][1], str)           # dynamic window length
    assert m["source_weights"] == "ema"


def _full_forward(model, turns, seed, audio_heard_before=None) -> np.ndarray:
    """[T, 25, 56]: the turns with every window recomputed from its turns' inputs."""
    ua, um, aa = zip(*turns)
    return full_forward_motion(model, np.stack(ua), um, np.stack(aa), PhiloxNormal(seed),
                               audio_heard_before=audio_heard_before)


def test_onnx_runtime_matches_the_imported_torch_model_for_12_turns(authors):
    """Turn by turn, same noise: the window fills (turns 1..8) and then slides (9..12). The torch
    model runs both in a Session (Model.from_torch) and with every window recomputed."""
    model = load_authors_model(authors["ckpt"], str(authors["w2v"]))
    turns = list(_turns(12))
    want = _full_forward(model, turns, 7)
    session = Session(authors["bundle"], backend="onnxruntime", seed=7)
    reference = Session(Model.from_torch(model), seed=7)
    for k, turn in enumerate(turns):
        got = session.step(*turn)
        assert got.shape == (25, 56)
        assert np.abs(got - want[k]).max() < 1e-3, f"turn {k}"
        assert np.abs(reference.step(*turn) - want[k]).max() < 1e-4, f"turn {k}"
    assert session.turns == 12
    assert session.info["attention"] == "window_recompute" and session.info["model_preset"] == authors["name"]


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


def test_window_sessions_batched_equal_each_alone(authors):
    """Window-recompute sessions of one Model, some at the same window length (one batch) and
    one at another (its own batch), cfg on and off: each gets its motion alone."""
    model = Model(authors["bundle"])
    settings = [dict(seed=1), dict(seed=2, cfg=2.0), dict(seed=3)]
    turns = list(_turns(6, seed=5))
    batched = [Session(model, **st) for st in settings]
    alone = [Session(model, **st) for st in settings]
    for t in turns[:2]:                               # the third session starts two turns behind
        for s in batched[:2] + alone[:2]:
            s.step(*t)
    for t in turns[2:5]:
        got = step_many([(s, *t) for s in batched])
        want = [s.step(*t) for s in alone]
        assert all(np.abs(g - w).max() < 1e-5 for g, w in zip(got, want))


# ---- refusals ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_state(preset):
    """The state dict of the model under test (raw weights, random values)."""
    return random_state(model_state_shapes(preset["name"], W2V_HIDDEN))


def _load(state, w2v, model, **args):
    return load_authors_model({"model": state, "args": model_args(model, W2V_HIDDEN, **args)}, str(w2v), ema=False)


def _shape(*dims) -> str:
    """A shape as the importer's messages print it, escaped for pytest.raises(match=...)."""
    return re.escape(str(tuple(dims)))


def test_missing_unexpected_and_misshapen_keys_are_named(authors, base_state):
    w2v, name, width, blocks, token_dim = (authors[k] for k in ("w2v", "name", "width", "blocks", "token_dim"))
    last = f"encoder_blocks.{blocks - 1}.attn.proj.weight"
    missing = {k: v for k, v in base_state.items() if k != last}
    with pytest.raises(ValueError, match=rf"missing \['{re.escape(last)}'\]"):
        _load(missing, w2v, name)
    extra = f"encoder_blocks.{blocks}.norm1.weight"           # one block more than the model has
    with pytest.raises(ValueError, match=rf"unexpected \['{re.escape(extra)}'\]"):
        _load({**base_state, extra: torch.ones(width)}, w2v, name)
    with pytest.raises(ValueError, match=rf"z_proj.weight has shape {_shape(width, token_dim // 2)}, "
                                         rf"expected {_shape(width, token_dim)} for {name}"):
        _load({**base_state, "z_proj.weight": torch.zeros(width, token_dim // 2)}, w2v, name)
    # The wrong width for the named model: another of their presets, with other block widths.
    other, (other_width, _, _) = next((n, v) for n, v in THEIR_MODELS.items() if v[0] != width)
    with pytest.raises(ValueError, match=rf"{other} expects encoder_blocks.0.attn.qkv.weight of shape "
                                         rf"{_shape(3 * other_width, other_width)}, got {_shape(3 * width, width)}"):
        _load(base_state, w2v, other)


def test_unsupported_variants_are_refused(authors, base_state):
    w2v, name, width = authors["w2v"], authors["name"], authors["width"]
    _load(base_state, w2v, name)                        # the unaltered state loads
    with pytest.raises(ValueError, match="full-attention"):
        _load(base_state, w2v, name, use_causal_attn=False)
    with pytest.raises(ValueError, match="encoder-decoder"):
        _load({**base_state, "decoder_embed.weight": torch.zeros(width, width)}, w2v, name)
    no_diff = {k: v for k, v in base_state.items() if not k.startswith("diffloss.")}
    with pytest.raises(ValueError, match="MLP-head"):
        _load({**no_diff, "mlp_head.0.weight": torch.zeros(width // 2, width)}, w2v, name, use_mseloss=True)
    with pytest.raises(ValueError, match="do_norm"):
        _load(base_state, w2v, name, do_norm=True)


def test_missing_or_mismatched_wav2vec2_is_explained(authors, base_state, tmp_path):
    name = authors["name"]
    with pytest.raises(FileNotFoundError, match="wav2vec2-large-960h-lv60-self"):
        _load(base_state, tmp_path / "nowhere", name)
    other = write_small_wav2vec2(tmp_path / "w2v48", hidden=48)
    with pytest.raises(ValueError, match=f"hidden size 48.*expects {W2V_HIDDEN}"):
        _load(base_state, other, name)
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
    assert "the pickled global io.open, which is not data" in result.output      # names what was refused
    assert not marker.exists()
    # argparse.Namespace and numpy arrays (their args hold the motion mean/std) are allowed.
    ok = tmp_path / "ok.pth"
    torch.save({"args": argparse.Namespace(mean=np.zeros(56, np.float32)), "model": {}}, ok)
    from timar_sdk.model.authors import read_authors_checkpoint
    assert read_authors_checkpoint(ok)["args"].mean.shape == (56,)


# ---- checkpoint refusals name the file and the problem (issue 13, items 8 and 14) --------------
def _as_numpy_1x(torch_save_bytes: bytes, renames=()) -> bytes:
    """The same checkpoint as numpy 1.x pickles it: arrays and scalars under numpy.core.multiarray
    (numpy 2 writes numpy._core.multiarray; only numpy 2 is installed, so the pickle's GLOBAL
    opcodes are rewritten). `renames`: further (old, new) byte replacements in the pickle."""
    import io
    import zipfile
    src = zipfile.ZipFile(io.BytesIO(torch_save_bytes))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/data.pkl"):
                assert b"cnumpy._core.multiarray\n" in data
                data = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
                for old, new in renames:
                    assert old in data
                    data = data.replace(old, new)
            z.writestr(info.filename, data)
    return out.getvalue()


def _saved(obj) -> bytes:
    import io
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_numpy_arrays_pickled_by_numpy_1x_are_read(tmp_path):
    from timar_sdk.model.authors import read_authors_checkpoint
    path = tmp_path / "numpy1.pth"
    args = argparse.Namespace(mean=np.arange(56, dtype=np.float32), std=np.ones(56), seed=np.int64(6666))
    path.write_bytes(_as_numpy_1x(_saved({"args": args, "model": {"w": torch.ones(2)}})))
    assert "numpy.core.multiarray._reconstruct" in torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    ckpt = read_authors_checkpoint(path)
    assert np.array_equal(ckpt["args"].mean, np.arange(56)) and ckpt["args"].std.dtype == np.float64
    assert ckpt["args"].seed == 6666


class _RunsCode:
    """A pickled call of exec (stands in for any payload)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').close()",))


def test_a_payload_beside_numpy_1x_arrays_is_refused_by_name_unexecuted(tmp_path):
    from timar_sdk.model.authors import read_authors_checkpoint
    marker = tmp_path / "executed"
    payload = tmp_path / "payload.pth"
    payload.write_bytes(_as_numpy_1x(_saved({"args": argparse.Namespace(mean=np.zeros(3)), "x": _RunsCode(marker)})))
    with pytest.raises(ValueError) as e:
        read_authors_checkpoint(payload)
    msg = str(e.value)
    assert f"ckpt: {payload} was refused by the weights-only loader: it holds the pickled global builtins.exec," in msg
    assert "numpy" not in msg.split("pickled global")[1].split("(allowed")[0]   # numpy 1.x names are not refused
    assert msg.endswith("nothing in it was executed") and "\n" not in msg
    assert not marker.exists()
    # Another function of numpy.core.multiarray is not allowed by the numpy 1.x names.
    other = tmp_path / "other.pth"
    other.write_bytes(_as_numpy_1x(_saved({"args": argparse.Namespace(s=np.float32(1.0))}),
                                   renames=[(b"cnumpy.core.multiarray\nscalar\n",
                                             b"cnumpy.core.multiarray\nfrombuffer\n")]))
    with pytest.raises(ValueError, match=r"pickled global numpy\.core\.multiarray\.frombuffer, which is not data"):
        read_authors_checkpoint(other)


def test_a_truncated_checkpoint_reads_corrupt_or_truncated(authors, tmp_path):
    data = authors["ckpt"].read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[:len(data) * 2 // 3])
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    for path in (cut, empty):
        result = CliRunner().invoke(export_cmd, ["--ckpt", str(path), "--wav2vec2", str(authors["w2v"]),
                                                 "--out", str(tmp_path / "b")])
        lines = result.output.strip().splitlines()
        assert result.exit_code != 0 and len(lines) == 1, result.output
        assert lines[0].startswith(f"Error: ckpt: {path} is a corrupt or truncated file"), lines[0]
        assert lines[0].endswith(("(0 bytes)", "saving or copying?)")), lines[0]      # whole, not cut mid-word
        assert not isinstance(result.exception, IndexError)


def test_misshapen_or_incomplete_authors_checkpoints_give_one_line(authors, base_state, tmp_path):
    # Same number of values, other shape: refused (it used to be reshaped silently).
    model, width, token_dim = authors["name"], authors["width"], authors["token_dim"]
    assert width != token_dim                                 # else the transpose would be no change
    with pytest.raises(ValueError, match=rf"z_proj.weight has shape {_shape(token_dim, width)}, "
                                         rf"expected {_shape(width, token_dim)}"):
        _load({**base_state, "z_proj.weight": base_state["z_proj.weight"].T.contiguous()}, authors["w2v"], model)
    cases = {"no_input_proj": {k: v for k, v in base_state.items() if k != "diffloss.net.input_proj.weight"},
             "not_tensor": {**base_state, "z_proj.bias": [0.0] * width}}
    for name, state in cases.items():
        path = tmp_path / f"{name}.pth"
        torch.save({"model": state, "args": model_args(model, W2V_HIDDEN)}, path)
        result = CliRunner().invoke(export_cmd, ["--ckpt", str(path), "--wav2vec2", str(authors["w2v"]),
                                                 "--out", str(tmp_path / "b")])
        lines = result.output.strip().splitlines()
        assert result.exit_code != 0 and len(lines) == 1, (name, result.output)
        assert lines[0].startswith(f"Error: ckpt: {path}: "), (name, lines[0])
        assert ("diffloss.net.input_proj.weight" if name == "no_input_proj" else "not tensors") in lines[0]


# ---- starting a stream's audio normalisation well (issue 13, item 13) ---------------------------
def _clips(seed=4):
    rng = np.random.default_rng(seed)
    return ((rng.standard_normal(48000) * 0.3).astype(np.float32),
            (rng.standard_normal(48000) * 0.08).astype(np.float32))


def test_prime_audio_normalization_starts_from_the_given_statistics(authors):
    from timar_sdk.audio import RunningNorm
    cu, ca = _clips()
    turns = list(_turns(3, seed=5))
    model = load_authors_model(authors["ckpt"], str(authors["w2v"]))
    want = _full_forward(model, turns, 3, audio_heard_before=(cu, ca))
    primed = Session(authors["bundle"], backend="onnxruntime", seed=3)
    primed.prime_audio_normalization(user_audio=cu, agent_audio=ca)
    got = [primed.step(*t) for t in turns]
    for k in range(len(turns)):
        assert np.abs(got[k] - want[k]).max() < 1e-3, f"turn {k}"
    cold = Session(authors["bundle"], backend="onnxruntime", seed=3).step(*turns[0])
    assert np.abs(cold - got[0]).max() > 1e-2                          # it does change the first turn

    # Statistics given as numbers (RunningNorm.from_stats) act like the clip they describe.
    a = ca.astype(np.float64)
    given = Session(authors["bundle"], backend="onnxruntime", seed=3)
    given.prime_audio_normalization(user_audio=RunningNorm.from_audio(cu),
                                    agent_audio=RunningNorm.from_stats(a.mean(), a.var(), a.size))
    assert np.abs(given.step(*turns[0]) - got[0]).max() < 1e-4
    # In the snapshot; reset() forgets it.
    assert given.get_state()["audio_norm"][0][0] == 48000 + 16000
    given.reset()
    assert np.array_equal(given.step(*turns[0]), cold)


def test_prime_audio_normalization_refuses_bad_input_and_cached_bundles(authors):
    from timar_sdk.audio import RunningNorm
    cu, ca = _clips()
    session = Session(authors["bundle"], backend="onnxruntime", seed=3)
    before = session.get_state()["audio_norm"]
    bad = [(dict(user_audio=cu, agent_audio=np.full(100, np.nan, np.float32)), "agent_audio"),
           (dict(user_audio=cu[:, None]), "user_audio"),
           (dict(agent_audio=[0.1, 0.2]), "agent_audio"),
           (dict(user_audio=RunningNorm()), "user_audio: expected statistics of at least one sample"),
           (dict(agent_audio=RunningNorm(10, float("nan"), 1.0)), "agent_audio: expected finite statistics")]
    for kwargs, want in bad:
        with pytest.raises(TimarInputError, match=f"^{want}"):
            session.prime_audio_normalization(**kwargs)
        assert session.get_state()["audio_norm"] == before          # nothing applied, not even user_audio
    with pytest.raises(TimarInputError, match="^user_audio: prime_audio_normalization is for window_recompute"):
        Session(backend="onnxruntime").prime_audio_normalization(user_audio=cu)


# ---- fused attention in the window graph (issue 16 item 4) ---------------------------------------
def test_fused_and_portable_window_graphs_equal_torch(authors, tmp_path):
    """The window graph exported with ONNX Runtime's MultiHeadAttention (the default) and with
    portable MatMul/Softmax attention: each gives the eager model's z within 1e-5, for a full
    window (turn-causal mask in every block but the last) and a one-turn window, batch 2."""
    import onnxruntime as ort

    from timar_sdk.export.onnx_export import export_window_bundle
    from timar_sdk.export.op_support import unsupported_ops

    model = load_authors_model(authors["ckpt"], str(authors["w2v"]))
    g = torch.Generator().manual_seed(3)
    windows = [torch.randn(2, turns * 110, authors["width"], generator=g) for turns in (8, 1)]
    for fused in (True, False):
        out = export_window_bundle(model, tmp_path / f"fused_{fused}", fused_attention=fused)
        graph = tmp_path / f"fused_{fused}" / "window_encoder.onnx"
        assert unsupported_ops(graph) == (["com.microsoft:MultiHeadAttention"] if fused else [])
        assert out["attention"] == "window_recompute"
        sess = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
        for tokens in windows:
            with torch.no_grad():
                want = model.forward_window(tokens).numpy()
            got = sess.run(None, {"tokens": tokens.numpy()})[0]
            assert got.shape == want.shape == (2, 25, authors["width"])
            assert np.abs(got - want).max() < 1e-5, (fused, tokens.shape)
    assert model.onnx_attention == "fused"          # the export's setting does not stay on the model
    with pytest.raises(ValueError, match="^fused_attention: expected True or False, got 'yes'"):
        export_window_bundle(model, tmp_path / "bad", fused_attention="yes")
    assert not (tmp_path / "bad").exists()
