"""Sparse upcycling (Komatsuzaki et al. 2023, "Sparse Upcycling: Training Mixture-of-Experts from Dense
Checkpoints"): the weights of an E-expert JetMoE made from a dense one, so that training the MoE starts where the
dense model stopped instead of from scratch.

The dense baseline of this codebase is a JetMoE with a single expert chosen with gate 1 (`num_local_experts=1,
num_experts_per_tok=1`). Upcycling copies its MLP into every MoE expert and its attention query / output projections
into every MoA expert; the embeddings, `kv_proj`, the norms, the MoA and MoE output biases and an untied LM head are
taken as they are. Routers are not copied (a dense router has one expert and nothing to learn): the new model keeps
its own freshly initialised ones, whatever entries (weights, buffers) they hold.

The invariant: with exact copies the upcycled model computes the dense model's function, whatever its routers pick.
A router's gates are a softmax over the token's k chosen logits, so they sum to 1. MoE: the output is
Σ_j g_j · MLP_j(x) + b = MLP(x) + b when every MLP_j is the dense MLP. MoA: each chosen expert makes the H query
heads of the dense model; they attend to the same shared keys and values, so the k head groups are equal, each is
projected back by the same output projection, and the gates mix k equal outputs into the dense one. The logits
are the dense model's up to float rounding (tests/model/test_upcycle.py). This is the dropless forward: rows
that a `capacity_factor` drops while training lose their experts' outputs.

Identical experts get different gradients only through the different tokens the routers send them; `noise > 0`
breaks the symmetry from the start with independent Gaussian noise on each copy, at the price of the invariant.
"""

from __future__ import annotations

import torch

from jetmoe.config import JetMoeConfig
from jetmoe.errors import ConfigError

#: Fields the upcycled model must share with the dense one: they fix the shape of every copied tensor (the experts'
#: but for their number), or, for the last three, what the copied weights compute.
SHARED_FIELDS = (
    "hidden_size", "vocab_size", "num_hidden_layers", "num_key_value_heads", "kv_channels", "intermediate_size",
    "tie_word_embeddings", "activation_function", "rope_theta", "rms_norm_eps",
)
#: State-dict name endings of the stacked expert weights (`ParallelExperts`, `[E, out, in]`): MoE `mlp.*`, MoA
#: `self_attention.experts.*`.
EXPERT_WEIGHTS = (".input_linear.weight", ".output_linear.weight")


def is_router_key(key: str) -> bool:
    """Whether a state-dict entry belongs to a router (its weight or any buffer): never copied."""
    return ".router." in key


def check_upcycle_source(dense_config: JetMoeConfig, config: JetMoeConfig, source: str = "the dense model") -> None:
    """ConfigError unless a model of `config` can be upcycled from the dense model of `dense_config`, which the
    message calls `source` (e.g. its directory)."""
    if dense_config.num_local_experts != 1:
        raise ConfigError(
            f"{source} is an MoE model (num_local_experts={dense_config.num_local_experts}); upcycling starts from a "
            "dense model (num_local_experts=1)"
        )
    for name in SHARED_FIELDS:
        dense, upcycled = getattr(dense_config, name), getattr(config, name)
        if dense != upcycled:
            raise ConfigError(f"{source} has {name}={dense!r}, but the upcycled model has {name}={upcycled!r}")


def upcycle_state_dict(
    dense_state: dict[str, torch.Tensor], dense_config: JetMoeConfig, config: JetMoeConfig, noise: float = 0.0,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """The state dict of a `config` model upcycled from a dense model's (`dense_state`, `dense_config`), with the
    dense checkpoint's key names: each expert weight `[1, out, in]` repeated into `[E, out, in]`, each copy plus
    Gaussian noise of std `noise · std(dense weight)` (drawn from `generator`); router entries left out (the model
    keeps its own); every other entry as it is."""
    check_upcycle_source(dense_config, config)
    if noise < 0:
        raise ConfigError(f"upcycle noise must be >= 0, got {noise}")
    E = config.num_local_experts
    upcycled = {}
    for key, tensor in dense_state.items():
        if is_router_key(key):
            continue
        upcycled[key] = _expert_copies(tensor, E, noise, generator) if key.endswith(EXPERT_WEIGHTS) else tensor
    return upcycled


def _expert_copies(w_1OI: torch.Tensor, E: int, noise: float, generator: torch.Generator | None) -> torch.Tensor:
    w_EOI = w_1OI.expand(E, -1, -1).clone()
    if not noise:
        return w_EOI
    std = noise * w_1OI.float().std()
    noise_EOI = torch.randn(w_EOI.shape, generator=generator, dtype=torch.float32).to(w_EOI.device) * std
    return (w_EOI.float() + noise_EOI).to(w_1OI.dtype)
