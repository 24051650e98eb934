"""JetMoE: Mixture of Attention heads + Mixture of MLP experts, HF-compatible, trained with Lightning."""

from jetmoe.config import JetMoeConfig
from jetmoe.model import (
    DynamicKVCache,
    JetMoeForCausalLM,
    JetMoeForSequenceClassification,
    JetMoeModel,
    StaticKVCache,
)

__version__ = "0.1.0"
__all__ = [
    "JetMoeConfig",
    "JetMoeModel",
    "JetMoeForCausalLM",
    "JetMoeForSequenceClassification",
    "DynamicKVCache",
    "StaticKVCache",
]
