"""One loaded Model serves many Sessions: same motion as sessions with their own model, whatever
the interleaving or the threads; backend and threads belong to the Model."""
import resource
import threading

import numpy as np
import pytest

from timar_sdk import Model, Session, TimarInputError, step_many


def conversation(turns, seed):
    rng = np.random.default_rng(seed)
    ua = (rng.standard_normal((turns, 16000)) * 0.2).astype(np.float32)
    aa = (rng.standard_normal((turns, 16000)) * 0.2).astype(np.float32)
    um = (rng.standard_normal((turns, 25, 56)) * 0.3).astype(np.float32)
    return ua, um, aa


SETTINGS = [dict(seed=1), dict(seed=2, cfg=2.0), dict(seed=3, history="feedback"), dict(seed=4, steps=2)]
TURNS = 10          # past the 7 cache slots: the ring wraps


def alone(settings, turns, data):
    s = Session(**settings)                   # its own model
    ua, um, aa = data
    return [s.step(ua[i], um[i] if i % 3 else None, aa[i]) for i in range(turns)]


@pytest.fixture(scope="module")
def expected():
    data = [conversation(TURNS, seed=k) for k in range(len(SETTINGS))]
    return data, [alone(st, TURNS, d) for st, d in zip(SETTINGS, data)]


def test_sessions_sharing_a_model_interleaved_equal_sessions_alone(expected):
    data, want = expected
    model = Model()
    sessions = [Session(model, **st) for st in SETTINGS]
    got = [[] for _ in sessions]
    for i in range(TURNS):                    # round robin, one turn each
        for k, (s, (ua, um, aa)) in enumerate(zip(sessions, data)):
            got[k].append(s.step(ua[i], um[i] if i % 3 else None, aa[i]))
    for k in range(len(sessions)):
        assert all(np.array_equal(g, w) for g, w in zip(got[k], want[k])), SETTINGS[k]


def test_sessions_of_one_model_on_threads_equal_sessions_alone(expected):
    data, want = expected
    model = Model()
    got, errors = [None] * len(SETTINGS), []

    def run(k):
        try:
            s = Session(model, **SETTINGS[k])
            ua, um, aa = data[k]
            got[k] = [s.step(ua[i], um[i] if i % 3 else None, aa[i]) for i in range(TURNS)]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(SETTINGS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and not any(t.is_alive() for t in threads)
    for k in range(len(SETTINGS)):
        assert all(np.array_equal(g, w) for g, w in zip(got[k], want[k])), SETTINGS[k]


def test_backend_and_threads_belong_to_the_model():
    model = Model(threads=1)
    for kw in (dict(backend="onnxruntime"), dict(threads=2)):
        name = next(iter(kw))
        with pytest.raises(TimarInputError, match=f"^{name}: set it on the Model"):
            Session(model, **kw)
    with pytest.raises(TimarInputError, match="threads: expected an integer in 1.."):
        Model(threads=10000)
    assert Session(model).info["backend"] == model.info["backend"] == "onnxruntime"


@pytest.mark.slow
def test_a_hundred_sessions_on_one_model_in_one_process():
    """Each more session costs its cache (state_bytes) and little else."""
    model = Model()
    ua, um, aa = conversation(1, seed=9)
    first = Session(model)
    first.step(ua[0], um[0], aa[0])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sessions = [Session(model, seed=k) for k in range(100)]
    outs = [s.step(ua[0], um[0], aa[0]) for s in sessions]
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    assert all(np.isfinite(o).all() for o in outs) and not np.array_equal(outs[0], outs[1])
    per_session = grown / 100
    assert per_session < first.state_bytes + 2e6, f"{per_session / 1e6:.1f} MB per session"


BATCH_SETTINGS = [dict(seed=11), dict(seed=12, cfg=2.0), dict(seed=13, temperature=0.5), dict(seed=14, steps=2),
                  dict(seed=15, history="feedback"), dict(seed=16, cfg=1.5, history="feedback"), dict(seed=17)]


def test_step_many_equals_each_session_alone():
    """Sessions at different turn counts, with and without user motion, other seeds and sampling
    settings, run batched turn after turn: each gets exactly its motion alone (1e-5)."""
    model = Model()
    n = len(BATCH_SETTINGS)
    data = [conversation(12, seed=20 + k) for k in range(n)]
    batched = [Session(model, **st) for st in BATCH_SETTINGS]
    alone = [Session(model, **st) for st in BATCH_SETTINGS]
    for k in range(n):                                   # session k starts k turns ahead
        ua, um, aa = data[k]
        for i in range(k):
            batched[k].step(ua[i], um[i], aa[i])
            alone[k].step(ua[i], um[i], aa[i])
    for turn in range(5):
        requests, want = [], []
        for k in range(n):
            i = k + turn
            ua, um, aa = data[k]
            motion = None if (i + k) % 3 == 0 else um[i]
            requests.append((batched[k], ua[i], motion, aa[i]))
            want.append(alone[k].step(ua[i], motion, aa[i]))
        got = step_many(requests)
        for k in range(n):
            assert np.abs(got[k] - want[k]).max() < 1e-5, (turn, BATCH_SETTINGS[k])
    assert [s.turns for s in batched] == [s.turns for s in alone]


def test_step_many_fails_only_the_session_with_bad_input():
    model = Model()
    ua, um, aa = conversation(2, seed=30)
    sessions = [Session(model, seed=k) for k in range(3)]
    clean = [Session(model, seed=k) for k in range(3)]
    bad_audio = ua[0].copy()
    bad_audio[7] = np.nan
    got = step_many([(sessions[0], ua[0], um[0], aa[0]), (sessions[1], bad_audio, um[0], aa[0]),
                     (sessions[2], ua[0], None, aa[0])])
    assert isinstance(got[1], TimarInputError) and "user_audio" in str(got[1]) and sessions[1].turns == 0
    assert np.abs(got[0] - clean[0].step(ua[0], um[0], aa[0])).max() < 1e-5
    assert np.abs(got[2] - clean[2].step(ua[0], None, aa[0])).max() < 1e-5
    # the refused session goes on as if nothing happened
    assert np.abs(sessions[1].step(ua[1], um[1], aa[1]) - clean[1].step(ua[1], um[1], aa[1])).max() < 1e-5


def test_step_many_refuses_sessions_of_two_models_or_twice_the_same():
    a, b = Session(), Session()
    ua, um, aa = conversation(1, seed=31)
    with pytest.raises(TimarInputError, match="one Model"):
        step_many([(a, ua[0], um[0], aa[0]), (b, ua[0], um[0], aa[0])])
    with pytest.raises(TimarInputError, match="each session at most once"):
        step_many([(a, ua[0], um[0], aa[0]), (a, ua[0], um[0], aa[0])])


def test_spinning_is_opt_in():
    """ONNX Runtime's threads sleep between operators unless the model asks them to spin (spinning
    threads fight any other busy process for the cores)."""
    def spinning(model):
        opts = model.backend.sessions["encoder_step"].get_session_options()
        return opts.get_session_config_entry("session.intra_op.allow_spinning")

    assert spinning(Model()) == "0" and spinning(Model(spin=True)) == "1"
    with pytest.raises(TimarInputError, match="spin: expected True or False"):
        Model(spin="yes")
