"""Mixture-of-Attention-heads self-attention and its key/value caches.

Each token picks k attention experts; expert e owns H query heads and an output projection, while keys and
values (H heads) are shared by all experts. With the k query groups laid out as `k·H` heads, query head
(slot j, head h) attends with key/value head h: grouped-query attention, done by SDPA with `enable_gqa`.

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
        H, k, Dh = self.num_heads, self.top_k, self.head_dim
        q_BTkA, routing = self.experts.map(x_BTD)
        # Query head (h, slot j) sits at index h·k + j, so that GQA pairs it with key/value head h.
        q_BQTD = q_BTkA.view(B, T, k, H, Dh).permute(0, 3, 2, 1, 4).reshape(B, H * k, T, Dh)
        k_BTA, v_BTA = self.kv_proj(x_BTD).chunk(2, dim=-1)
        k_BHTD = k_BTA.view(B, T, H, Dh).transpose(1, 2)
        v_BHTD = v_BTA.view(B, T, H, Dh).transpose(1, 2)

        cos_BTD, sin_BTD = rope
        q_BQTD, k_BHTD = apply_rotary(q_BQTD, cos_BTD, sin_BTD), apply_rotary(k_BHTD, cos_BTD, sin_BTD)
        if cache is not None:
            k_BHTD, v_BHTD = cache.update(self.layer_idx, k_BHTD, v_BHTD, cache_position_T)

        dropout = self.dropout if self.training else 0.0
        weights = None
        if output_attentions:
            o_BQTD, weights = self._eager_attention(q_BQTD, k_BHTD, v_BHTD, mask, dropout)
        else:
            o_BQTD = F.scaled_dot_product_attention(
                q_BQTD, k_BHTD, v_BHTD, attn_mask=mask, dropout_p=dropout, is_causal=mask is None and T > 1,
                enable_gqa=True,
            )
        o_BTkA = o_BQTD.view(B, H, k, T, Dh).permute(0, 3, 2, 1, 4).reshape(B, T, k, H * Dh)
        return self.experts.reduce(o_BTkA, routing), weights, routing

    def _eager_attention(self, q_BQTD, k_BHTD, v_BHTD, mask, dropout):
        """Explicit softmax attention; returns weights `[B, k·H, T, S]` in transformers' head order (slot-major)."""
        B, Q, T, Dh = q_BQTD.shape
        S = k_BHTD.shape[2]
        k_BQSD = k_BHTD.repeat_interleave(self.top_k, dim=1)
        v_BQSD = v_BHTD.repeat_interleave(self.top_k, dim=1)
        scores_BQTS = (q_BQTD @ k_BQSD.transpose(-2, -1)) * Dh**-0.5
        if mask is None:
            mask = torch.ones(T, S, dtype=torch.bool, device=q_BQTD.device).tril(S - T)
        if mask.dtype == torch.bool:
            scores_BQTS = scores_BQTS.masked_fill(~mask, torch.finfo(scores_BQTS.dtype).min)
        else:
            scores_BQTS = scores_BQTS + mask
        weights_BQTS = scores_BQTS.softmax(dim=-1, dtype=torch.float32).to(q_BQTD.dtype)
        weights_BQTS = F.dropout(weights_BQTS, p=dropout, training=self.training)
        o_BQTD = weights_BQTS @ v_BQSD
        hf_order = weights_BQTS.view(B, self.num_heads, self.top_k, T, S).transpose(1, 2).reshape(B, Q, T, S)
        return o_BQTD, hf_order
