"""JetMoE: Mixture of Attention heads + Mixture of MLP experts, transformers-compatible, trained with Lightning."""

from jetmoe.config import JetMoeConfig
from jetmoe.hf_io import load_pretrained, save_pretrained
from jetmoe.model import (
    DynamicKVCache,
    JetMoeForCausalLM,
    JetMoeForSequenceClassification,
    JetMoeModel,
    StaticKVCache,
)

__version__ = "0.1.0"
__all__ = [
    "DynamicKVCache",
    "JetMoeConfig",
    "JetMoeForCausalLM",
    "JetMoeForSequenceClassification",
    "JetMoeModel",
    "StaticKVCache",
    "load_pretrained",
    "save_pretrained",
]
