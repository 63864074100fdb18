import os

# The suite runs in pytest-xdist workers, each with torch's pool of one thread per core: more threads than cores.
# Idle OpenMP threads that spin then take the cores from the workers that have work, so they sleep here instead.
# This is the test suite's setting only; the demo, the benchmarks and the library set nothing.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "lowbit", deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.load_profile("lowbit")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
