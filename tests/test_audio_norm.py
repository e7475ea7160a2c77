"""RunningNorm: the streaming stand-in for the authors' whole-file audio normalisation."""
import numpy as np
import pytest

from timar_sdk.audio import RunningNorm


def test_running_statistics_equal_the_statistics_of_everything_so_far():
    rng = np.random.default_rng(0)
    turns = [(rng.standard_normal(16000) * s + o).astype(np.float32) for s, o in ((0.01, 0.0), (0.3, 0.1), (0.05, -0.2))]
    norm = RunningNorm()
    for k, turn in enumerate(turns):
        norm = norm.update(turn)
        heard = np.concatenate(turns[:k + 1]).astype(np.float64)
        want = (turn - heard.mean()) / np.sqrt(heard.var() + 1e-7)
        assert np.abs(norm.apply(turn) - want).max() < 1e-4
    # Immutable: update returns a new object; a snapshot round-trips.
    assert RunningNorm().update(turns[0]) != RunningNorm()
    assert RunningNorm.from_list(norm.to_list()) == norm


def _whole_file(a):
    a = a.astype(np.float64)
    return (a - a.mean()) / np.sqrt(a.var() + 1e-7)


def test_a_primed_stream_starts_close_to_whole_file_normalisation():
    """Issue 13 item 13: statistics known in advance (a calibration clip of the speaker, or a
    mean/variance the application gives) make the first turns close to whole-file normalisation;
    a cold start normalises a quiet first turn to unit variance."""
    rng = np.random.default_rng(1)
    levels = [0.02, 0.3, 0.25, 0.2, 0.3, 0.25]          # a quiet first second, then speech
    stream = np.concatenate([rng.standard_normal(16000) * s for s in levels]).astype(np.float32)
    calibration = (rng.standard_normal(5 * 16000) * 0.25).astype(np.float32)
    ref = _whole_file(stream)[:16000]

    def first_turn_error(norm):
        x = norm.update(stream[:16000]).apply(stream[:16000])
        return np.sqrt(np.mean((x - ref) ** 2) / np.mean(ref ** 2))

    cold = first_turn_error(RunningNorm())
    from_clip = first_turn_error(RunningNorm.from_audio(calibration))
    from_stats = first_turn_error(RunningNorm.from_stats(0.0, 0.25 ** 2, 5 * 16000))
    assert cold > 5.0                  # the quiet turn blown up to unit variance
    assert from_clip < 0.3 and from_stats < 0.3


def test_given_statistics_equal_those_of_the_audio_they_describe():
    rng = np.random.default_rng(2)
    clip = (rng.standard_normal(48000) * 0.2 + 0.01).astype(np.float32)
    a = clip.astype(np.float64)
    from_clip = RunningNorm.from_audio(clip)
    given = RunningNorm.from_stats(a.mean(), a.var(), a.size)
    assert from_clip.count == given.count == a.size
    assert abs(from_clip.mean - given.mean) < 1e-12 and abs(from_clip.var - given.var) < 1e-12
    turn = clip[:16000]
    assert np.abs(from_clip.update(turn).apply(turn) - given.update(turn).apply(turn)).max() < 1e-5


@pytest.mark.parametrize("kwargs, name", [(dict(mean=float("nan"), var=0.1, count=10), "mean"),
                                          (dict(mean=0.0, var=-1.0, count=10), "var"),
                                          (dict(mean=0.0, var=float("inf"), count=10), "var"),
                                          (dict(mean=0.0, var=0.1, count=0), "count"),
                                          (dict(mean=0.0, var=0.1, count=2.5), "count")])
def test_bad_given_statistics_are_refused_by_name(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}: "):
        RunningNorm.from_stats(**kwargs)


def test_calibration_clip_must_be_finite_float_samples():
    for bad in (np.zeros(0, np.float32), np.array([0.1, np.nan], np.float32), np.zeros((2, 10), np.float32)):
        with pytest.raises(ValueError, match="expected a non-empty 1-D array"):
            RunningNorm.from_audio(bad)
    with pytest.raises(ValueError, match="count"):
        RunningNorm().check()
