"""Shared pytest settings: deterministic seeds and a hypothesis profile sized for a 2-core CPU."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

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
