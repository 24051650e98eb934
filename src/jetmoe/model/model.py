"""JetMoE, top to bottom: norms and rotary embeddings, the Mixture of MLP experts (MoE), the Mixture of Attention
heads (MoA), the decoder block, and the base, causal-LM and sequence-classification models.

Every layer has two top-k routers: one picks k attention experts per token (each owns H query heads and an output
projection; keys and values are shared), one picks k GLU MLP experts. Module and parameter names, forward
arguments and outputs follow transformers' JetMoe, so checkpoints and code move between the two; the numbers match
it to rounding (tests/model/test_model.py).

The tensor operations come from an `ops` object passed down from `JetMoeModel.forward` (`select_ops`): the
reference definitions of `jetmoe.model.ops`, or fast kernels with the same results (`config.kernels`). An expert
layer is three pieces: routing (`routing.TopKRouter`), dispatch of each token to its k experts' rows sorted by
expert, and the experts' products over those rows; `combine` mixes each token's k outputs with its gates.

Beyond transformers: the auxiliary router losses are computed whenever the model trains, routers run in fp32,
nothing in the forward synchronises with the host (with `kernels: fused`), decoder blocks support activation
checkpointing, and a training forward with labels computes the cross-entropy fused with the LM head, never
materialising the logits.

Shape letters: B batch, T query positions, S key positions, N = B·T tokens, D model width, E experts, k experts
per token, M = N·k routed rows, F expert hidden width, H key/value heads, Q = H·k query heads, Dh head dim,
A = H·Dh, V vocabulary, C classes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from jetmoe.config import JetMoeConfig
from jetmoe.losses import causal_lm_cross_entropy, load_balancing_loss, load_balancing_per_router, router_z_loss
from jetmoe.model.backends import select_ops
from jetmoe.model.cache import DynamicKVCache, KVCache, StaticKVCache
from jetmoe.model.generation import generate
from jetmoe.model.masks import causal_padding_mask
from jetmoe.model.ops import ReferenceOps
from jetmoe.model.outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast, SequenceClassifierOutputWithPast
from jetmoe.model.routing import Routing, TopKRouter

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}
Rope = tuple[torch.Tensor, torch.Tensor]


# ----------------------------------------------------------------------------- norms and positions


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 and cast back (transformers' JetMoeRMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x_BTD: torch.Tensor, ops: ReferenceOps) -> torch.Tensor:
        return ops.rms_norm(x_BTD, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding: cos and sin of `position · θ^(-2i/Dh)`, recomputed in fp32 (no buffer)."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def forward(self, position_ids_BT: torch.Tensor, dtype: torch.dtype) -> Rope:
        exponent = torch.arange(0, self.head_dim, 2, device=position_ids_BT.device, dtype=torch.float32)
        inv_freq = 1.0 / (self.theta ** (exponent / self.head_dim))  # [Dh / 2]
        freqs_BTh = position_ids_BT[..., None].float() * inv_freq
        emb_BTD = torch.cat((freqs_BTh, freqs_BTh), dim=-1)
        return emb_BTD.cos().to(dtype), emb_BTD.sin().to(dtype)


# ----------------------------------------------------------------------------- experts


def make_router(config: JetMoeConfig) -> TopKRouter:
    """A MoA or MoE router with the config's routing options."""
    return TopKRouter(
        config.hidden_size, config.num_local_experts, config.num_experts_per_tok,
        selection_bias=config.balancing == "bias", capacity_factor=config.capacity_factor,
        force_uniform=config.router_force_uniform,
    )


class ParallelExperts(nn.Module):
    """E linear maps stored as one `[E, out, in]` weight (the transformers / ScatterMoE layout)."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, init_std: float) -> None:
        super().__init__()
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.init_std)


class MixtureOfExperts(nn.Module):
    """Top-k mixture of GLU MLP experts with a shared output bias (transformers' JetMoeMoE)."""

    def __init__(self, config: JetMoeConfig) -> None:
        super().__init__()
        D, F_, E, std = config.hidden_size, config.intermediate_size, config.num_local_experts, config.initializer_range
        self.activation = ACTIVATIONS[config.activation_function]
        self.router = make_router(config)
        self.input_linear = ParallelExperts(E, D, 2 * F_, std)  # [E, 2F, D]: gate | up
        self.output_linear = ParallelExperts(E, F_, D, std)  # [E, D, F]
        self.bias = nn.Parameter(torch.empty(D))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.bias)

    def forward(self, x_BTD: torch.Tensor, ops: ReferenceOps) -> tuple[torch.Tensor, Routing]:
        x_ND = x_BTD.flatten(0, 1)
        routing = self.router(x_ND)
        x_MD = ops.dispatch(x_ND, routing)  # each token's k copies, sorted by expert
        y_MD = ops.expert_mlp(x_MD, self.input_linear.weight, self.output_linear.weight, self.activation, routing)
        return ops.combine(y_MD, routing, self.bias).view_as(x_BTD), routing


class MixtureOfAttentionHeads(nn.Module):
    """The expert half of MoA (transformers' JetMoeMoA): per-expert query and output projections.

    `map` turns each token into k groups of H query heads, one group per chosen expert, laid out as `[B, T, H·k, Dh]`
    with query head h·k + j = head h of the j-th expert (so it attends with key/value head h); `reduce` projects the
    k attention outputs back with the same experts and mixes them with the gates."""

    def __init__(self, config: JetMoeConfig) -> None:
        super().__init__()
        D, E, std = config.hidden_size, config.num_local_experts, config.initializer_range
        self.num_heads, self.head_dim = config.num_key_value_heads, config.kv_channels
        A = self.num_heads * self.head_dim
        self.router = make_router(config)
        self.input_linear = ParallelExperts(E, D, A, std)  # [E, A, D]: queries
        self.output_linear = ParallelExperts(E, A, D, std)  # [E, D, A]: outputs
        self.bias = nn.Parameter(torch.empty(D))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.bias)

    def map(self, x_BTD: torch.Tensor, ops: ReferenceOps) -> tuple[torch.Tensor, Routing]:
        B, T, _ = x_BTD.shape
        x_ND = x_BTD.flatten(0, 1)
        routing = self.router(x_ND)
        q_MA = ops.expert_linear(ops.dispatch(x_ND, routing), self.input_linear.weight, routing)
        return ops.to_heads(q_MA, routing, self.num_heads).view(B, T, -1, self.head_dim), routing

    def reduce(self, o_BTQD: torch.Tensor, routing: Routing, ops: ReferenceOps) -> torch.Tensor:
        B, T, _, _ = o_BTQD.shape
        o_MA = ops.from_heads(o_BTQD.flatten(0, 1), routing, self.num_heads)
        y_MD = ops.expert_linear(o_MA, self.output_linear.weight, routing)
        return ops.combine(y_MD, routing, self.bias).view(B, T, -1)


# ----------------------------------------------------------------------------- attention


class JetMoeAttention(nn.Module):
    """MoA self-attention: routed queries and outputs, keys and values shared by all experts (transformers'
    JetMoeAttention)."""

    def __init__(self, config: JetMoeConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim, self.top_k = config.num_key_value_heads, config.kv_channels, config.num_experts_per_tok
        self.dropout = config.attention_dropout
        self.experts = MixtureOfAttentionHeads(config)
        self.kv_proj = nn.Linear(config.hidden_size, 2 * self.num_heads * self.head_dim, bias=False)

    def forward(
        self, x_BTD: torch.Tensor, rope: Rope, mask: torch.Tensor | None, cache: KVCache | None,
        cache_position_T: torch.Tensor, ops: ReferenceOps, output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, Routing]:
        B, T, _ = x_BTD.shape
        q_BTQD, routing = self.experts.map(x_BTD, ops)
        kv_BT2HD = ops.linear(x_BTD, self.kv_proj.weight).view(B, T, 2, self.num_heads, self.head_dim)
        cos_BT1D, sin_BT1D = (t.unsqueeze(2) for t in rope)
        q_BQTD = ops.rotary(q_BTQD, cos_BT1D, sin_BT1D).transpose(1, 2)  # views: attention takes strided inputs
        k_BHSD = ops.rotary(kv_BT2HD[:, :, 0], cos_BT1D, sin_BT1D).transpose(1, 2)
        v_BHSD = kv_BT2HD[:, :, 1].transpose(1, 2)
        if cache is not None:
            k_BHSD, v_BHSD = cache.update(self.layer_idx, k_BHSD, v_BHSD, cache_position_T)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if output_attentions:
            o_BQTD, weights = self._attention_with_weights(q_BQTD, k_BHSD, v_BHSD, mask, dropout)
        else:
            o_BQTD = ops.attention(q_BQTD, k_BHSD, v_BHSD, mask, dropout)
        return self.experts.reduce(o_BQTD.transpose(1, 2), routing, ops), weights, routing

    def _attention_with_weights(self, q_BQTD, k_BHSD, v_BHSD, mask, dropout):
        """Explicit softmax attention, for `output_attentions`; weights `[B, k·H, T, S]` in transformers' head order
        (expert slot major)."""
        B, Q, T, Dh = q_BQTD.shape
        S = k_BHSD.shape[2]
        k_BQSD, v_BQSD = (t.repeat_interleave(self.top_k, dim=1) for t in (k_BHSD, v_BHSD))
        scores_BQTS = (q_BQTD @ k_BQSD.transpose(-2, -1)) * Dh**-0.5
        if mask is None:
            mask = torch.ones(T, S, dtype=torch.bool, device=q_BQTD.device).tril(S - T)
        if mask.dtype == torch.bool:
            scores_BQTS = scores_BQTS.masked_fill(~mask, torch.finfo(scores_BQTS.dtype).min)
        else:
            scores_BQTS = scores_BQTS + mask
        weights_BQTS = scores_BQTS.softmax(dim=-1, dtype=torch.float32).to(q_BQTD.dtype)
        weights_BQTS = F.dropout(weights_BQTS, p=dropout, training=self.training)
        hf_order = weights_BQTS.view(B, self.num_heads, self.top_k, T, S).transpose(1, 2).reshape(B, Q, T, S)
        return weights_BQTS @ v_BQSD, hf_order


# ----------------------------------------------------------------------------- the block and the models


class JetMoeDecoderLayer(nn.Module):
    """Pre-norm block: x + MoA(norm(x)), then x + MoE(norm(x))."""

    def __init__(self, config: JetMoeConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attention = JetMoeAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MixtureOfExperts(config)

    def forward(
        self, x_BTD: torch.Tensor, rope: Rope, mask: torch.Tensor | None, cache: KVCache | None,
        cache_position_T: torch.Tensor, ops: ReferenceOps, output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, Routing, Routing]:
        """The new hidden states, the attention weights (or None), and the MoA and MoE routings."""
        attn_BTD, weights, moa = self.self_attention(
            self.input_layernorm(x_BTD, ops), rope, mask, cache, cache_position_T, ops, output_attentions
        )
        x_BTD = x_BTD + attn_BTD
        mlp_BTD, moe = self.mlp(self.post_attention_layernorm(x_BTD, ops), ops)
        return x_BTD + mlp_BTD, weights, moa, moe


def init_module_weights(module: nn.Module, std: float) -> None:
    """(Re-)initialise `module`'s own parameters (not its children's) as transformers does: normal(0, std) weights,
    zero biases, unit norms. Works on parameters allocated by `to_empty()` (a meta-built model) and, one module at a
    time, on full-size stand-ins for sharded parameters (`jetmoe.distributed`)."""
    if isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif hasattr(module, "reset_parameters"):  # RMSNorm, ParallelExperts, the MoA / MoE output biases
        module.reset_parameters()


class JetMoePreTrainedModel(nn.Module):
    """Weight init and activation checkpointing shared by the JetMoE models. Checkpoints in the Hugging Face layout
    are read and written by `jetmoe.hf_io` (`load_pretrained`, `save_pretrained`)."""

    #: Wraps the operations of every forward, for a parallelism that moves computation between devices (expert
    #: parallelism: `jetmoe.distributed.expert_parallel`); None runs them as selected.
    ops_wrapper: Callable[[ReferenceOps], ReferenceOps] | None = None

    def __init__(self, config: JetMoeConfig) -> None:
        super().__init__()
        self.config = config

    def _materialize(self) -> None:
        """Allocate the meta-built parameters on the default device and initialise them with `init_weights`, so that
        `Model(config)` equals, for the same seed, a model built under `torch.device("meta")` and materialised later
        with `to_empty()` + `init_weights()` (the sharded path). Under an ambient meta device the model stays there."""
        device = torch.get_default_device()
        if device.type != "meta":
            self.to_empty(device=device)
        self.tie_weights()
        if device.type != "meta":
            self.init_weights()

    def tie_weights(self) -> None:
        """Tie the LM head to the embeddings where configured (after `to_empty()` or sharding)."""

    def init_weights(self) -> None:
        """(Re-)initialise every parameter with `init_module_weights`; a tied weight once, as the embedding."""
        done: set[int] = set()
        for module in self.modules():
            params = [id(p) for p in module.parameters(recurse=False)]
            if params and not all(p in done for p in params):
                done.update(params)
                init_module_weights(module, self.config.initializer_range)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """Zero the routers' selection biases: buffers draw nothing from the RNG, and after `to_empty()` (a
        meta-built model) they hold whatever memory they were given."""
        for router in self.routers():
            router.reset_buffers()

    def routers(self) -> list[TopKRouter]:
        """Every router, in the order of the model's routings (layer 0 MoA, layer 0 MoE, layer 1 MoA, ...)."""
        return [router for layer in self.base_model.layers
                for router in (layer.self_attention.experts.router, layer.mlp.router)]

    def num_parameters(self, only_trainable: bool = False) -> int:
        seen = {id(p): p for p in self.parameters() if p.requires_grad or not only_trainable}
        return sum(p.numel() for p in seen.values())

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each decoder block in the backward pass instead of storing its activations."""
        self.base_model.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.base_model.gradient_checkpointing = False

    @property
    def base_model(self) -> "JetMoeModel":
        return self if isinstance(self, JetMoeModel) else self.model

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def ops_for(self, x: torch.Tensor) -> ReferenceOps:
        """The operations of a forward on activations like `x` (`config.kernels`, `config.expert_impl`), passed
        through `ops_wrapper` when a parallelism set one."""
        ops = select_ops(self.config.kernels, self.config.expert_impl, x.device, x.dtype)
        return ops if self.ops_wrapper is None else self.ops_wrapper(ops)


class JetMoeModel(JetMoePreTrainedModel):
    """Embeddings, decoder blocks and the final norm."""

    def __init__(self, config: JetMoeConfig) -> None:
        super().__init__(config)
        with torch.device("meta"):
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
            self.layers = nn.ModuleList(JetMoeDecoderLayer(config, i) for i in range(config.num_hidden_layers))
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.kv_channels, config.rope_theta)
        self.gradient_checkpointing = False
        self._materialize()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        output_router_logits: bool = False,
        cache_position: torch.Tensor | None = None,
    ) -> MoeModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            _check_token_ids(input_ids, self.config.vocab_size)
            inputs_embeds = self.embed_tokens(input_ids)
        x_BTD = inputs_embeds
        B, T, _ = x_BTD.shape
        if T == 0:
            raise ValueError("the input sequence is empty (length 0)")
        ops = self.ops_for(x_BTD)

        cache = past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not self.training:
            cache = DynamicKVCache(self.config.num_hidden_layers)
        past = cache.get_seq_length() if isinstance(cache, DynamicKVCache) else 0
        if cache_position is None:
            cache_position = torch.arange(past, past + T, device=x_BTD.device)
        if position_ids is None:
            position_ids = cache_position.unsqueeze(0)
        if position_ids.shape[-1] != T:
            raise ValueError(f"position_ids has length {position_ids.shape[-1]}, expected {T}")
        max_pos = self.config.max_position_embeddings
        if past + T > max_pos:
            raise ValueError(f"sequence length {past + T} exceeds max_position_embeddings={max_pos}")
        kv_len = cache.max_len if isinstance(cache, StaticKVCache) else past + T
        mask = self._attention_mask(attention_mask, cache_position, B, T, kv_len, past, cache)
        rope = self.rotary_emb(position_ids, x_BTD.dtype)

        hidden, attentions, routings = [], [], []
        for layer in self.layers:
            if output_hidden_states:
                hidden.append(x_BTD)
            args = (x_BTD, rope, mask, cache, cache_position, ops, output_attentions)
            if self.gradient_checkpointing and self.training:
                x_BTD, weights, moa, moe = checkpoint(layer, *args, use_reentrant=False)
            else:
                x_BTD, weights, moa, moe = layer(*args)
            routings += [moa, moe]
            attentions.append(weights)
        x_BTD = self.norm(x_BTD, ops)
        if output_hidden_states:
            hidden.append(x_BTD)
        return MoeModelOutputWithPast(
            last_hidden_state=x_BTD,
            past_key_values=cache,
            hidden_states=tuple(hidden) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
            router_logits=tuple(r.logits_NE for r in routings) if output_router_logits else None,
            routings=tuple(routings),
        )

    @staticmethod
    def _attention_mask(attention_mask, cache_position_T, B, T, kv_len, past, cache) -> torch.Tensor | None:
        """Boolean `[B, 1, T, S]` mask, or None where plain causal attention is exact."""
        if attention_mask is not None and attention_mask.dim() == 4:
            if attention_mask.shape[0] not in (1, B) or attention_mask.shape[-2:] != (T, kv_len):
                raise ValueError(
                    f"4-D attention_mask must have shape [{B}, 1, {T}, {kv_len}], got {list(attention_mask.shape)}"
                )
            return attention_mask
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] < kv_len:
                raise ValueError(
                    f"attention_mask must have shape [batch={B}, past+current length={kv_len}], "
                    f"got {list(attention_mask.shape)}"
                )
        elif not isinstance(cache, StaticKVCache) and (past == 0 or T == 1):
            return None  # plain causal attention, or one query seeing the whole cache
        return causal_padding_mask(attention_mask, cache_position_T.expand(B, T), kv_len)


def router_losses(
    routings: tuple[Routing, ...], weight_N: torch.Tensor | None, balancing: str, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The balancing method's auxiliary loss (`JetMoeConfig.balancing`) and the z-loss of all routers; tokens of
    `weight_N` 0 (padding) left out. The bias method's is sequence-wise: each of the `batch_size` rows on its own."""
    logits_RNE = torch.stack([routing.logits_NE for routing in routings])
    z_loss = router_z_loss(logits_RNE, weight_N)
    if balancing == "none":
        return torch.zeros_like(z_loss), z_loss
    groups = batch_size if balancing == "bias" else 1
    if weight_N is None:
        weight_N = torch.ones(logits_RNE.shape[1], dtype=torch.float32, device=logits_RNE.device)
    sums = [routing.expert_sums(weight_N, groups) for routing in routings]
    tokens_x1 = weight_N.view(groups, -1).sum(-1, keepdim=True).clamp_min(1).squeeze(0)  # [G, 1], or [1]
    tokens_RxE = torch.stack([assigned for assigned, _ in sums]) / tokens_x1
    probs_RxE = torch.stack([probs for _, probs in sums]) / tokens_x1
    if balancing == "bias":
        return load_balancing_per_router(tokens_RxE, probs_RxE).mean(), z_loss
    return load_balancing_loss(tokens_RxE, probs_RxE, per_router=balancing == "aux_per_router"), z_loss


class JetMoeForCausalLM(JetMoePreTrainedModel):
    """The LM head (tied to the embeddings by default) and the training loss:
    CE + aux_loss_coef · load balancing + router_z_loss_coef · z-loss."""

    def __init__(self, config: JetMoeConfig) -> None:
        super().__init__(config)
        with torch.device("meta"):
            self.model = JetMoeModel(config)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._materialize()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        output_router_logits: bool | None = None,
        cache_position: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        skip_logits: bool | None = None,
    ) -> MoeCausalLMOutputWithPast:
        """transformers' arguments, plus `skip_logits`: return no logits (`out.logits` is None) and compute the
        cross-entropy fused with the LM head, chunk by chunk, so the `[B, T, V]` logits and their gradient never
        exist. Default: skipped when the model trains with `labels` (what a training loop wants; the convention of
        Liger-Kernel), kept otherwise. Same loss either way."""
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        if skip_logits is None:
            skip_logits = self.training and labels is not None
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            output_router_logits=output_router_logits, cache_position=cache_position,
        )
        h_BTD = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            h_BTD = h_BTD[:, -logits_to_keep:] if logits_to_keep else h_BTD
        else:
            h_BTD = h_BTD[:, logits_to_keep]
        ops = self.ops_for(h_BTD)
        logits_BTV = None if skip_logits else ops.linear(h_BTD, self.lm_head.weight)

        aux_loss = z_loss = None
        if self.training or output_router_logits:
            weight_N = _padding_weights(attention_mask, out.routings)
            aux_loss, z_loss = router_losses(out.routings, weight_N, self.config.balancing, h_BTD.shape[0])
        loss = ce_loss = None
        if labels is not None:
            if logits_BTV is None:
                ce_loss = ops.lm_head_loss(h_BTD, self.lm_head.weight, labels)
            else:
                ce_loss = causal_lm_cross_entropy(logits_BTV, labels)
            loss = ce_loss
            if aux_loss is not None:
                loss = loss + self.config.aux_loss_coef * aux_loss + self.config.router_z_loss_coef * z_loss
        return MoeCausalLMOutputWithPast(
            loss=loss, aux_loss=aux_loss, logits=logits_BTV, past_key_values=out.past_key_values,
            hidden_states=out.hidden_states, attentions=out.attentions, router_logits=out.router_logits,
            ce_loss=ce_loss, z_loss=z_loss, routings=out.routings,
        )

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Greedy (default) or sampled continuation with a KV cache; see `jetmoe.model.generation.generate`."""
        return generate(self, input_ids, **kwargs)


def _padding_weights(attention_mask: torch.Tensor | None, routings: tuple[Routing, ...]) -> torch.Tensor | None:
    """1 for real tokens, 0 for padding, `[N]` fp32, from a 2-D attention mask (only it says what padding is); its
    last columns when it also covers cached positions."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    tokens_per_row = routings[0].experts_Nk.shape[0] // attention_mask.shape[0]
    return attention_mask[:, -tokens_per_row:].reshape(-1).to(routings[0].logits_NE.device, torch.float32)


class JetMoeForSequenceClassification(JetMoePreTrainedModel):
    """Classifies a sequence from its last non-padding token (transformers' convention)."""

    def __init__(self, config: JetMoeConfig) -> None:
        super().__init__(config)
        with torch.device("meta"):
            self.model = JetMoeModel(config)
            self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self._materialize()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> SequenceClassifierOutputWithPast:
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states,
        )
        logits_BTC = self.score(out.last_hidden_state)
        B, T = logits_BTC.shape[:2]
        pad = self.config.pad_token_id
        if pad is None and B != 1:
            raise ValueError("sequence classification of a batch needs config.pad_token_id to find the last token")
        if pad is None or input_ids is None:
            last_B = torch.full((B,), T - 1, device=logits_BTC.device)
        else:  # the last non-padding token (left or right padding)
            positions_T = torch.arange(T, device=logits_BTC.device)
            last_B = (positions_T * (input_ids != pad)).argmax(-1)
        pooled_BC = logits_BTC[torch.arange(B, device=logits_BTC.device), last_B]
        loss = None if labels is None else self._loss(pooled_BC, labels)
        return SequenceClassifierOutputWithPast(
            loss=loss, logits=pooled_BC, past_key_values=out.past_key_values,
            hidden_states=out.hidden_states, attentions=out.attentions,
        )

    def _loss(self, pooled_BC: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        problem = self.config.problem_type
        if problem is None:
            if self.config.num_labels == 1:
                problem = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem = "single_label_classification"
            else:
                problem = "multi_label_classification"
        labels = labels.to(pooled_BC.device)
        if problem == "regression":
            return F.mse_loss(pooled_BC.squeeze(-1).float(), labels.squeeze(-1).float())
        if problem == "single_label_classification":
            return F.cross_entropy(pooled_BC.float().view(-1, self.config.num_labels), labels.view(-1))
        return F.binary_cross_entropy_with_logits(pooled_BC.float(), labels.float())


def _check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Out-of-range ids would index past the embedding table. Checked for CPU tensors in eager mode only, where
    reading the values costs no device synchronisation; accelerator inputs are checked where they are made."""
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    on_host = input_ids.device.type == "cpu" and not torch.compiler.is_compiling()
    if on_host and input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        raise ValueError(
            f"input_ids must be in [0, vocab_size={vocab_size}), got values in "
            f"[{int(input_ids.min())}, {int(input_ids.max())}]"
        )
