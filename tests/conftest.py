"""Shared pytest settings: deterministic seeds and a hypothesis profile sized for a 2-core CPU."""

import os

import torch

# Without a GPU, Triton kernels can only run under Triton's interpreter, which is chosen when a kernel
# module is first imported: set it before any test imports one (a value set by the caller is kept).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "default",
    max_examples=int(os.environ.get("MLA_REF_HYPOTHESIS_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
settings.load_profile("default")


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny models are dominated by per-operation overhead: one torch thread avoids hand-offs on a busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
