"""Mixture-of-Attention-heads self-attention and its key/value caches.

Each token picks k attention experts; expert e owns H query heads and an output projection, while keys and
values (H heads) are shared by all experts. With the k query groups laid out as `H·k` heads, query head
h·k + j (head h of slot j) attends with key/value head h: grouped-query attention, done by SDPA with
`enable_gqa`. Queries, keys and values stay in `[B, T, heads, Dh]` memory and reach SDPA as transposed views.

Shape letters: B batch, T query length, S key length, H key/value heads, k experts per token,
Dh head dim, A = H·Dh, D model width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from jetmoe.config import JetMoeConfig
from jetmoe.model.experts import MixtureOfAttentionHeads, Routing
from jetmoe.model.layers import apply_rotary
from jetmoe.model.ops import (
    causal_attention_applies, causal_attention, linear, mask_scores, single_query_attention,
    single_query_attention_applies, upcast_bf16,
)


class DynamicKVCache:
    """Keys and values grown by concatenation, one entry per layer (the default for `use_cache=True`)."""

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def get_seq_length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def update(
        self, layer_idx: int, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor, cache_position_T: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer_idx] is not None:
            k_BHTD = torch.cat([self.keys[layer_idx], k_BHTD], dim=2)
            v_BHTD = torch.cat([self.values[layer_idx], v_BHTD], dim=2)
        self.keys[layer_idx], self.values[layer_idx] = k_BHTD, v_BHTD
        return k_BHTD, v_BHTD

    def reorder(self, index_B: torch.Tensor) -> None:
        """Keep only the batch rows in `index_B` (e.g. after some sequences finished)."""
        self.keys = [None if k is None else k[index_B] for k in self.keys]
        self.values = [None if v is None else v[index_B] for v in self.values]


class StaticKVCache:
    """Preallocated `[B, H, max_len, Dh]` buffers written in place at `cache_position`: shapes never change,
    so a compiled single-token decode step is reused for every token."""

    def __init__(self, config: JetMoeConfig, batch_size: int, max_len: int, device, dtype) -> None:
        shape = (batch_size, config.num_key_value_heads, max_len, config.kv_channels)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.max_len = max_len

    def get_seq_length(self) -> int:
        return self.max_len

    def update(
        self, layer_idx: int, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor, cache_position_T: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys[layer_idx].index_copy_(2, cache_position_T, k_BHTD)
        self.values[layer_idx].index_copy_(2, cache_position_T, v_BHTD)
        return self.keys[layer_idx], self.values[layer_idx]


KVCache = DynamicKVCache | StaticKVCache


def _sdpa(q_BQTD, k_BHTD, v_BHTD, mask, dropout: float, is_causal: bool) -> torch.Tensor:
    """SDPA with grouped-query heads (query head i uses key/value head i // (Q / H)); `is_causal` without a mask
    lets the CPU pick its flash kernel. bf16 runs in fp32 where the bf16 policy says so (`ops.upcast_bf16`), and
    bf16 training on a CPU with bf16 units takes `ops.causal_attention` (blocked bf16 GEMMs, forward and backward).
    A compiled decode step on the CPU (one query row) takes `ops.single_query_attention`."""
    if causal_attention_applies(q_BQTD, k_BHTD, mask, dropout, is_causal):
        return causal_attention(q_BQTD, k_BHTD, v_BHTD)
    dtype = q_BQTD.dtype
    if upcast_bf16(q_BQTD.device.type, dtype):
        q_BQTD, k_BHTD, v_BHTD = q_BQTD.float(), k_BHTD.float(), v_BHTD.float()
    if single_query_attention_applies(q_BQTD, dropout):  # a compiled decode step on the CPU
        return single_query_attention(q_BQTD, k_BHTD, v_BHTD, mask).to(dtype)
    o_BQTD = F.scaled_dot_product_attention(
        q_BQTD, k_BHTD, v_BHTD, attn_mask=mask, dropout_p=dropout, is_causal=is_causal, enable_gqa=True
    )
    return o_BQTD.to(dtype)


class JetMoeAttention(nn.Module):
    """MoA self-attention (HF: JetMoeAttention; module names kept for checkpoint compatibility)."""

    def __init__(self, config: JetMoeConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = config.num_key_value_heads, config.kv_channels
        self.top_k = config.num_experts_per_tok
        self.dropout = config.attention_dropout
        self.experts = MixtureOfAttentionHeads(config)
        self.kv_proj = nn.Linear(config.hidden_size, 2 * self.num_heads * self.head_dim, bias=False)

    def forward(
        self,
        x_BTD: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
        cache_position_T: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, Routing]:
        B, T, _ = x_BTD.shape
        H, Dh = self.num_heads, self.head_dim
        # Queries come as [B, T, H·k, Dh], query head h·k + j (slot j) next to the others of key/value head h.
        q_BTQD, state = self.experts.map(x_BTD)
        kv_BT2HD = linear(x_BTD, self.kv_proj.weight).view(B, T, 2, H, Dh)

        cos_BT1D, sin_BT1D = (t.unsqueeze(2) for t in rope)
        q_BTQD = apply_rotary(q_BTQD, cos_BT1D, sin_BT1D)
        k_BHTD = apply_rotary(kv_BT2HD[:, :, 0], cos_BT1D, sin_BT1D).transpose(1, 2)
        v_BHTD = kv_BT2HD[:, :, 1].transpose(1, 2)
        if cache is not None:
            k_BHTD, v_BHTD = cache.update(self.layer_idx, k_BHTD, v_BHTD, cache_position_T)

        q_BQTD = q_BTQD.transpose(1, 2)  # a view: SDPA takes strided inputs
        dropout = self.dropout if self.training else 0.0
        weights = None
        if output_attentions:
            o_BQTD, weights = self._eager_attention(q_BQTD, k_BHTD, v_BHTD, mask, dropout)
        else:
            o_BQTD = _sdpa(q_BQTD, k_BHTD, v_BHTD, mask, dropout, is_causal=mask is None and T > 1)
        return self.experts.reduce(o_BQTD.transpose(1, 2), state), weights, state[0]

    def _eager_attention(self, q_BQTD, k_BHTD, v_BHTD, mask, dropout):
        """Explicit softmax attention; returns weights `[B, k·H, T, S]` in transformers' head order (slot-major)."""
        B, Q, T, Dh = q_BQTD.shape
        S = k_BHTD.shape[2]
        k_BQSD = k_BHTD.repeat_interleave(self.top_k, dim=1)
        v_BQSD = v_BHTD.repeat_interleave(self.top_k, dim=1)
        scores_BQTS = (q_BQTD @ k_BQSD.transpose(-2, -1)) * Dh**-0.5
        if mask is None:
            mask = torch.ones(T, S, dtype=torch.bool, device=q_BQTD.device).tril(S - T)
        scores_BQTS = mask_scores(scores_BQTS, mask)
        weights_BQTS = scores_BQTS.softmax(dim=-1, dtype=torch.float32).to(q_BQTD.dtype)
        weights_BQTS = F.dropout(weights_BQTS, p=dropout, training=self.training)
        o_BQTD = weights_BQTS @ v_BQSD
        hf_order = weights_BQTS.view(B, self.num_heads, self.top_k, T, S).transpose(1, 2).reshape(B, Q, T, S)
        return o_BQTD, hf_order
