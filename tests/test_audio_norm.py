"""RunningNorm: the streaming stand-in for the authors' whole-file audio normalisation."""
import numpy as np

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
