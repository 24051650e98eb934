"""Build the `transformers` twin of one of our models (same weights), for parity tests."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")


def hf_config(config):
    """transformers.JetMoeConfig with the same fields (eager attention: exact softmax, returns weights)."""
    known = set(transformers.JetMoeConfig.__dataclass_fields__) if hasattr(
        transformers.JetMoeConfig, "__dataclass_fields__") else None
    fields = {k: v for k, v in config.to_dict().items() if known is None or k in known}
    fields.pop("num_attention_heads", None)
    hf = transformers.JetMoeConfig(**fields, num_labels=config.num_labels)
    hf._attn_implementation = "eager"
    return hf


def hf_twin(model, cls_name: str = "JetMoeForCausalLM"):
    hf = getattr(transformers, cls_name)(hf_config(model.config)).eval()
    result = hf.load_state_dict(model.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return hf
