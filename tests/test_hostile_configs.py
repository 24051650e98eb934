"""Randomised (property-style) pass over config values: every combination either builds a working model or
raises one ValueError that names a field; nothing else escapes (no crash inside a kernel, no hang)."""

import random

import pytest
import torch

from jetmoe import JetMoeConfig, JetMoeForCausalLM
from jetmoe.config import PRESETS

VALUES = [-(2**40), -1, 0, 1, 2, 3, 7, 8, 16, 0.5, 1.5, float("nan"), float("inf"), None, "8", True]
FIELDS = ["vocab_size", "hidden_size", "num_hidden_layers", "num_key_value_heads", "kv_channels",
          "intermediate_size", "max_position_embeddings", "num_local_experts", "num_experts_per_tok",
          "rms_norm_eps", "initializer_range", "aux_loss_coef", "router_z_loss_coef", "attention_dropout",
          "rope_theta", "bos_token_id", "eos_token_id", "pad_token_id"]


@pytest.mark.parametrize("seed", range(5))
def test_random_config_values_fail_cleanly_or_work(seed):
    rng = random.Random(seed)
    field_names = {f for f in FIELDS}
    for _ in range(40):
        changes = {name: rng.choice(VALUES) for name in rng.sample(FIELDS, rng.randint(1, 3))}
        try:
            config = JetMoeConfig(**{**PRESETS["test"], **changes})
        except (ValueError, TypeError) as err:
            assert "\n" not in str(err)
            assert any(name in str(err) for name in field_names | {"rope"}), (changes, err)
            continue
        model = JetMoeForCausalLM(config).eval()
        ids = torch.randint(0, config.vocab_size, (1, min(4, config.max_position_embeddings)))
        assert model(ids).logits.shape[-1] == config.vocab_size
