"""Shared fixtures: tiny configs and models, deterministic seeds, and the devices a test runs on."""

from __future__ import annotations

import pytest
import torch

from jetmoe import JetMoeConfig


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_config() -> JetMoeConfig:
    return JetMoeConfig.from_name("test", pad_token_id=0)


CUDA = pytest.param(
    "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
)


@pytest.fixture(params=["cpu", CUDA])
def device(request) -> torch.device:
    """A test taking this runs on the CPU, and on CUDA too under `-m gpu` (the `gpu` instances)."""
    return torch.device(request.param)
