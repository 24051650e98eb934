"""The JetMoE model (torch only): `model.py` reads top to bottom; `routing.py` is the router; `ops.py` the reference
tensor operations and `backends.py` the fast ones that replace them (`config.kernels`); `generation.py` decodes."""

from jetmoe.model.cache import DynamicKVCache, StaticKVCache
from jetmoe.model.masks import packed_causal_mask
from jetmoe.model.model import (
    JetMoeForCausalLM,
    JetMoeForSequenceClassification,
    JetMoeModel,
    JetMoePreTrainedModel,
    init_module_weights,
)
from jetmoe.model.outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast, SequenceClassifierOutputWithPast
from jetmoe.model.routing import Routing, TopKRouter

__all__ = [
    "DynamicKVCache",
    "JetMoeForCausalLM",
    "JetMoeForSequenceClassification",
    "JetMoeModel",
    "JetMoePreTrainedModel",
    "MoeCausalLMOutputWithPast",
    "MoeModelOutputWithPast",
    "Routing",
    "SequenceClassifierOutputWithPast",
    "StaticKVCache",
    "TopKRouter",
    "init_module_weights",
    "packed_causal_mask",
]
