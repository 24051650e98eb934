"""Autoregressive generation with a KV cache: greedy by default, or temperature / top-k / top-p sampling.

Batches may be left-padded (pass `attention_mask`); position ids then count real tokens only. With
`static_cache=True` the cache is preallocated and every decode step has the same shapes, so
`compile=True` compiles the single-token step once (`fullgraph=True`) and reuses it for every token.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from jetmoe.model.cache import DynamicKVCache, StaticKVCache


def _filter_logits(logits_BV: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    if top_k is not None and top_k > 0:
        kth_B1 = logits_BV.topk(min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        cum_BV = sorted_BV.softmax(-1).cumsum(-1)
        drop_BV = cum_BV - sorted_BV.softmax(-1) > top_p  # keep the smallest set whose mass reaches top_p
        logits_BV = logits_BV.masked_fill(drop_BV.scatter(-1, order_BV, drop_BV), float("-inf"))
    return logits_BV


def check_sampling(do_sample: bool, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """ValueError naming the first sampling argument out of its range."""
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 or None: no top-k filter), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 or None: no nucleus filter), got {top_p}")


def next_token(
    logits_BV: torch.Tensor,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row: argmax, or a sample from the filtered, tempered distribution."""
    if not do_sample:
        return logits_BV.argmax(-1)
    probs_BV = _filter_logits(logits_BV.float() / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


def decode_step(model, ids_BT, position_BT, cache, cache_position_T, mask_BS):
    """Logits `[B, V]` of the last position; the cache takes the new keys and values."""
    out = model(
        input_ids=ids_BT, attention_mask=mask_BS, position_ids=position_BT, past_key_values=cache,
        cache_position=cache_position_T, use_cache=True, logits_to_keep=1,
    )
    return out.logits[:, -1]


def _compiled_decode_step(device: torch.device):
    """The single-token step compiled once per shape. On CPU the compiled wrapper is C++ (`cpp_wrapper`): a
    decode step is a few dozen small kernels, and their Python launch overhead is a visible share of it."""
    options = {"cpp_wrapper": True} if device.type == "cpu" else None
    return torch.compile(decode_step, fullgraph=True, dynamic=False, options=options)


def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    static_cache: bool = False,
    compile: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return `[B, T + n]` token ids, n <= max_new_tokens (stops early once every row has emitted EOS).

    `eos_token_id` defaults to the config's; finished rows are filled with `pad_token_id` (or EOS).
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty [batch, length] tensor, got shape {list(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    check_sampling(do_sample, temperature, top_k, top_p)
    config = model.config
    B, T = input_ids.shape
    total = T + max_new_tokens
    if total > config.max_position_embeddings:
        raise ValueError(
            f"prompt length {T} + max_new_tokens {max_new_tokens} exceeds max_position_embeddings="
            f"{config.max_position_embeddings}"
        )
    device = input_ids.device
    eos = config.eos_token_ids if eos_token_id is None else (
        list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
    )
    pad = pad_token_id if pad_token_id is not None else (config.pad_token_id if config.pad_token_id is not None
                                                         else (eos[0] if eos else 0))
    eos_E = torch.tensor(eos, device=device, dtype=torch.long)

    mask_BS = torch.ones(B, total, dtype=torch.long, device=device)
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {list(attention_mask.shape)} != input_ids shape {[B, T]}")
        mask_BS[:, :T] = attention_mask
    # Left padding: positions count real tokens only.
    position_BS = (mask_BS.cumsum(-1) - 1).clamp(min=0)

    was_training = model.training
    if was_training:  # `eval()` and `train()` walk every module: ~1 ms each on a 4-layer model
        model.eval()
    if static_cache:
        cache = StaticKVCache(config, B, total, device, model.dtype)
    else:
        cache = DynamicKVCache(config.num_hidden_layers)
    step = _compiled_decode_step(device) if compile else decode_step

    # Prefill the prompt.
    logits_BV = decode_step(
        model, input_ids, position_BS[:, :T], cache, torch.arange(T, device=device),
        mask_BS if static_cache else mask_BS[:, :T] if attention_mask is not None else None,
    )
    out_ids = [input_ids]
    finished_B = torch.zeros(B, dtype=torch.bool, device=device)
    for t in range(T, total):
        ids_B = next_token(logits_BV, do_sample, temperature, top_k, top_p, generator)
        if eos:  # without EOS no row ever finishes: skip the bookkeeping (and its host sync)
            ids_B = torch.where(finished_B, torch.full_like(ids_B, pad), ids_B)
            finished_B = finished_B | torch.isin(ids_B, eos_E)
        out_ids.append(ids_B[:, None])
        if t == total - 1 or (eos and bool(finished_B.all())):
            break
        step_mask = mask_BS if static_cache else (mask_BS[:, : t + 1] if attention_mask is not None else None)
        # With the static cache every compiled step after the first has the same shapes and inputs: skip
        # re-checking its guards (a tenth of a millisecond a token on the CPU).
        same_graph = compile and static_cache and t > T
        with torch.compiler.set_stance(skip_guard_eval_unsafe=True) if same_graph else nullcontext():
            logits_BV = step(
                model, ids_B[:, None], position_BS[:, t : t + 1], cache, torch.tensor([t], device=device), step_mask
            )
    if was_training:
        model.train()
    return torch.cat(out_ids, dim=1)
