"""Shared fixtures: tiny configs and models, deterministic seeds."""

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
