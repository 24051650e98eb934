"""Small building blocks: RMSNorm, rotary position embeddings, attention masks."""

from __future__ import annotations

import torch
from torch import nn

from jetmoe.model.ops import rms_norm, rotary


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 and cast back (as transformers' JetMoeRMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return rms_norm(x_BTD, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE); frequencies are recomputed in fp32, so there is no buffer to materialise."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta

    def forward(self, position_ids_BT: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        exponent_H = torch.arange(0, self.head_dim, 2, device=position_ids_BT.device, dtype=torch.float32)
        inv_freq_H = 1.0 / (self.theta ** (exponent_H / self.head_dim))  # H = head_dim / 2
        freqs_BTH = position_ids_BT[..., None].float() * inv_freq_H
        emb_BTD = torch.cat((freqs_BTH, freqs_BTH), dim=-1)
        return emb_BTD.cos().to(dtype), emb_BTD.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`x * cos + rotate_half(x) * sin` with `rotate_half(x) = (-x2, x1)`; `cos`/`sin` broadcast against `x`
    (e.g. `[B, T, 1, Dh]` for `x` of shape `[B, T, heads, Dh]`)."""
    return rotary(x, cos, sin)


def packed_causal_mask(position_ids_BT: torch.Tensor) -> torch.Tensor:
    """Boolean `[B, 1, T, T]` mask for packed documents: causal, and no attention across document boundaries.

    A document starts wherever `position_ids` is 0 (the packing convention of `jetmoe.data`).
    """
    doc_BT = torch.cumsum((position_ids_BT == 0).int(), dim=-1)
    T = position_ids_BT.shape[-1]
    causal_TT = torch.ones(T, T, dtype=torch.bool, device=position_ids_BT.device).tril()
    same_doc_BTT = doc_BT[:, :, None] == doc_BT[:, None, :]
    return (same_doc_BTT & causal_TT).unsqueeze(1)


def causal_padding_mask(
    attention_mask_BS: torch.Tensor | None, query_pos_BT: torch.Tensor, kv_len: int
) -> torch.Tensor:
    """Boolean `[B, 1, T, S]` mask: key slot s is visible to a query at absolute position p when s <= p and
    `attention_mask[b, s]` is 1. A query that would see no key (a left-padding position) sees itself instead,
    so softmax never gets an empty row.

    `query_pos_BT` are cache slots (0..S-1) of the queries, `attention_mask_BS` covers all S key slots.
    """
    key_pos_S = torch.arange(kv_len, device=query_pos_BT.device)
    visible_BTS = key_pos_S[None, None, :] <= query_pos_BT[:, :, None]
    if attention_mask_BS is not None:
        visible_BTS = visible_BTS & attention_mask_BS[:, None, :kv_len].bool()
    itself_BTS = key_pos_S[None, None, :] == query_pos_BT[:, :, None]
    visible_BTS = visible_BTS | (itself_BTS & ~visible_BTS.any(-1, keepdim=True))
    return visible_BTS.unsqueeze(1)
