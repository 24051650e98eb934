"""The JetMoE model (torch only)."""

from jetmoe.model.attention import DynamicKVCache, StaticKVCache
from jetmoe.model.transformer import (
    JetMoeForCausalLM,
    JetMoeForSequenceClassification,
    JetMoeModel,
    JetMoePreTrainedModel,
    MoeCausalLMOutputWithPast,
    MoeModelOutputWithPast,
    SequenceClassifierOutputWithPast,
)

__all__ = [
    "DynamicKVCache",
    "StaticKVCache",
    "JetMoeForCausalLM",
    "JetMoeForSequenceClassification",
    "JetMoeModel",
    "JetMoePreTrainedModel",
    "MoeCausalLMOutputWithPast",
    "MoeModelOutputWithPast",
    "SequenceClassifierOutputWithPast",
]
