"""Learning-rate schedules at their key steps, AdamW parameter groups."""

from __future__ import annotations

import math

import pytest
import torch

from jetmoe import JetMoeConfig, JetMoeForCausalLM
from jetmoe.training.config import OptimConfig, TrainerConfig
from jetmoe.training.optim import build_optimizer, lr_lambda, param_groups


def test_wsd_warmup_stable_then_1_sqrt_decay_to_min():
    f = lr_lambda("wsd", max_steps=100, warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.1)
    assert f(0) == pytest.approx(0.1)  # linear warmup: (step + 1) / warmup
    assert f(4) == pytest.approx(0.5)
    assert f(9) == pytest.approx(1.0)
    assert f(10) == f(50) == f(79) == 1.0  # stable until the last 20 steps
    assert f(84) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(5 / 20)))  # 1-sqrt, 5 steps into the decay
    assert f(99) == pytest.approx(0.1)  # the final step runs at min_lr_ratio
    values = [f(s) for s in range(80, 100)]
    assert values == sorted(values, reverse=True)


def test_wsd_without_warmup_or_decay_is_constant():
    f = lr_lambda("wsd", max_steps=10, warmup_steps=0, decay_fraction=0.0)
    assert [f(s) for s in range(10)] == [1.0] * 10


def test_cosine_warmup_then_half_cosine_to_min():
    f = lr_lambda("cosine", max_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert f(9) == pytest.approx(1.0)
    assert f(59) == pytest.approx(0.55)  # halfway: min + (1 - min) / 2
    assert f(109) == pytest.approx(0.1)
    values = [f(s) for s in range(10, 110)]
    assert values == sorted(values, reverse=True)


def test_constant_after_warmup():
    f = lr_lambda("constant", max_steps=50, warmup_steps=4)
    assert [f(s) for s in (0, 3, 4, 49)] == pytest.approx([0.25, 1.0, 1.0, 1.0])


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown lr schedule 'linear'"):
        lr_lambda("linear", max_steps=10)


@pytest.fixture
def model(tiny_config: JetMoeConfig) -> JetMoeForCausalLM:
    return JetMoeForCausalLM(tiny_config)


def _ids(params) -> set[int]:
    return {id(p) for p in params}


def test_param_groups_decay_matrices_and_expert_weights_only(model):
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    assert any(p.ndim == 3 for p in decay["params"])  # the experts' stacked weights
    embedding = model.model.embed_tokens.weight
    assert model.lm_head.weight is embedding
    assert id(embedding) in _ids(no_decay["params"])  # the tied lm_head with it, counted once
    assert all(p.ndim == 1 for p in no_decay["params"] if p is not embedding)
    unique = _ids(model.parameters())
    assert _ids(decay["params"]) | _ids(no_decay["params"]) == unique
    assert len(decay["params"]) + len(no_decay["params"]) == len(unique)


def test_param_groups_flags_move_embeddings_and_norms_into_decay(model):
    (only,) = param_groups(model, 0.1, decay_embeddings=True, decay_norms_and_biases=True)
    assert _ids(only["params"]) == _ids(model.parameters())


def test_build_optimizer_steps_the_schedule_per_step(model):
    optim = OptimConfig(lr=1e-3, warmup_steps=2, decay_fraction=0.5, min_lr_ratio=0.1)
    optimizer, scheduler = build_optimizer(model, optim, TrainerConfig(max_steps=4))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["betas"] == (0.9, 0.95)
    lrs = []
    for _ in range(4):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3 * (0.1 + 0.9 * (1 - math.sqrt(0.5))), 1e-4])
