"""Boolean attention masks (True: may attend), `[B, 1, T, S]`."""

from __future__ import annotations

import torch


def packed_causal_mask(position_ids_BT: torch.Tensor) -> torch.Tensor:
    """Causal, and no attention across document boundaries, for packed documents: a document starts wherever
    `position_ids` is 0 (the packing convention of `jetmoe.data`)."""
    doc_BT = torch.cumsum((position_ids_BT == 0).int(), dim=-1)
    T = position_ids_BT.shape[-1]
    causal_TT = torch.ones(T, T, dtype=torch.bool, device=position_ids_BT.device).tril()
    same_doc_BTT = doc_BT[:, :, None] == doc_BT[:, None, :]
    return (same_doc_BTT & causal_TT).unsqueeze(1)


def causal_padding_mask(attention_mask_BS: torch.Tensor | None, query_pos_BT: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Key slot s is visible to a query at cache slot p when s <= p and `attention_mask[b, s]` is 1. A query that
    would see no key (a left-padding position) sees itself instead, so softmax never gets an empty row.

    `query_pos_BT` are cache slots (0..S-1) of the queries, `attention_mask_BS` covers all S key slots."""
    key_pos_S = torch.arange(kv_len, device=query_pos_BT.device)
    visible_BTS = key_pos_S[None, None, :] <= query_pos_BT[:, :, None]
    if attention_mask_BS is not None:
        visible_BTS = visible_BTS & attention_mask_BS[:, None, :kv_len].bool()
    itself_BTS = key_pos_S[None, None, :] == query_pos_BT[:, :, None]
    visible_BTS = visible_BTS | (itself_BTS & ~visible_BTS.any(-1, keepdim=True))
    return visible_BTS.unsqueeze(1)
