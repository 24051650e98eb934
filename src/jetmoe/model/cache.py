"""Key/value caches for decoding: one grown by concatenation, one preallocated (for compiled decode steps)."""

from __future__ import annotations

import torch

from jetmoe.config import JetMoeConfig


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


class StaticKVCache:
    """Preallocated `[B, H, max_len, Dh]` buffers written in place at `cache_position`: shapes never change, so a
    compiled single-token decode step is reused for every token."""

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
