import numpy as np
import pytest


class RngNoise:
    """A NoiseSource for tests: numpy standard normals from a seed."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def normal(self, shape):
        return self.rng.standard_normal(shape).astype(np.float32)


@pytest.fixture
def noise():
    return RngNoise
