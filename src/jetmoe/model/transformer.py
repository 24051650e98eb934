"""JetMoeModel, JetMoeForCausalLM and JetMoeForSequenceClassification.

Forward arguments, outputs and parameter names follow transformers' JetMoe, so checkpoints and code move
between the two. Differences that matter for training: the auxiliary router losses are computed whenever the
model trains (not only with `output_router_logits`), routers run in fp32, experts use grouped GEMMs, nothing in
the forward synchronises with the host, decoder blocks support activation checkpointing, and
`JetMoeForCausalLM(..., labels=..., skip_logits=True)` computes the CE fused with the LM head without
materialising the logits (what a training loop wants).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from jetmoe import hf_io
from jetmoe.config import JetMoeConfig
from jetmoe.losses import causal_lm_cross_entropy, linear_cross_entropy, load_balancing_loss, router_z_loss
from jetmoe.model.attention import DynamicKVCache, JetMoeAttention, KVCache, StaticKVCache
from jetmoe.model.experts import MixtureOfExperts
from jetmoe.model.layers import RMSNorm, RotaryEmbedding, causal_padding_mask
from jetmoe.model.ops import linear


class ModelOutput:
    """Attribute access plus `out["name"]` and `to_tuple()` (non-None fields), like transformers' outputs."""

    def __getitem__(self, name: str) -> Any:
        return getattr(self, name)

    def to_tuple(self) -> tuple:
        return tuple(v for v in (getattr(self, f.name) for f in fields(self)) if v is not None)


@dataclass
class MoeModelOutputWithPast(ModelOutput):
    last_hidden_state: torch.Tensor
    past_key_values: KVCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None


@dataclass
class MoeCausalLMOutputWithPast(ModelOutput):
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: KVCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    ce_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None


@dataclass
class SequenceClassifierOutputWithPast(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: KVCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class JetMoeDecoderLayer(nn.Module):
    """Pre-norm block: x + MoA(norm(x)), then x + MoE(norm(x))."""

    def __init__(self, config: JetMoeConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attention = JetMoeAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MixtureOfExperts(config)

    def forward(
        self,
        x_BTD: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
        cache_position_T: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Returns the new hidden states, attention weights (or None), MoA and MoE router logits `[B·T, E]`."""
        attn_BTD, weights, routing = self.self_attention(
            self.input_layernorm(x_BTD), rope, mask, cache, cache_position_T, output_attentions
        )
        x_BTD = x_BTD + attn_BTD
        mlp_BTD, moe_logits_NE = self.mlp(self.post_attention_layernorm(x_BTD))
        return x_BTD + mlp_BTD, weights, routing.logits_NE, moe_logits_NE


class JetMoePreTrainedModel(nn.Module):
    """Weight init, activation checkpointing and HF-format checkpoint I/O shared by the JetMoE models."""

    def __init__(self, config: JetMoeConfig) -> None:
        super().__init__()
        self.config = config

    def _materialize(self) -> None:
        """Allocate the (meta-built) parameters on the default device and initialise them with `init_weights`.

        Building on meta and initialising once makes `Model(config)` equal, for the same seed, to a model built
        under `torch.device("meta")` and materialised later with `to_empty()` + `init_weights()` (FSDP's path).
        Under an ambient meta device the model stays there.
        """
        device = torch.get_default_device()
        if device.type != "meta":
            self.to_empty(device=device)
        self.tie_weights()
        if device.type != "meta":
            self.init_weights()

    def tie_weights(self) -> None:
        """Tie the LM head to the embeddings where configured (after `to_empty()` or sharding)."""

    def init_weights(self) -> None:
        """(Re-)initialise every parameter as transformers does: normal(0, initializer_range), zero biases,
        unit norms. Works after `to_empty()` on a model built on the meta device."""
        std = self.config.initializer_range
        done: set[int] = set()  # a tied weight is initialised once, as the embedding
        for module in self.modules():
            params = [id(p) for p in module.parameters(recurse=False)]
            if not params or all(p in done for p in params):
                continue
            done.update(params)
            if isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.padding_idx is not None:
                    with torch.no_grad():
                        module.weight[module.padding_idx].zero_()
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            else:  # RMSNorm, ParallelExperts, the MoA/MoE output biases
                module.reset_parameters()

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

    def save_pretrained(self, save_directory: str | Path) -> None:
        """Write `config.json` + `model.safetensors` (transformers' JetMoe key names), atomically."""
        architecture = type(self).__name__
        hf_io.save_checkpoint(save_directory, self.config, self.state_dict(), architecture)

    @classmethod
    def from_pretrained(cls, directory: str | Path, **config_overrides: Any):
        """Load a directory written by `save_pretrained` here or in transformers (local paths only)."""
        config, state_dict = hf_io.load_checkpoint(directory)
        if config_overrides:
            config = config.replace(**config_overrides)
        with torch.device("meta"):
            model = cls(config)
        hf_io.load_into(model, state_dict, source=directory)
        return model


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
        cache: KVCache | None = None,
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

        cache = cache if cache is not None else past_key_values
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

        all_hidden, all_attn, router_logits = [], [], []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden.append(x_BTD)
            if self.gradient_checkpointing and self.training:
                x_BTD, weights, moa_logits, moe_logits = checkpoint(
                    layer, x_BTD, rope, mask, cache, cache_position, output_attentions, use_reentrant=False
                )
            else:
                x_BTD, weights, moa_logits, moe_logits = layer(
                    x_BTD, rope, mask, cache, cache_position, output_attentions
                )
            router_logits += [moa_logits, moe_logits]
            if output_attentions:
                all_attn.append(weights)
        x_BTD = self.norm(x_BTD)
        if output_hidden_states:
            all_hidden.append(x_BTD)
        return MoeModelOutputWithPast(
            last_hidden_state=x_BTD,
            past_key_values=cache,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attn) if output_attentions else None,
            router_logits=tuple(router_logits),
        )

    @staticmethod
    def _attention_mask(attention_mask, cache_position_T, B, T, kv_len, past, cache) -> torch.Tensor | None:
        """Boolean `[B, 1, T, S]` mask, or None where SDPA's own causal masking is exact."""
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
            return None  # plain causal attention (is_causal) or one query seeing the whole cache
        return causal_padding_mask(attention_mask, cache_position_T.expand(B, T), kv_len)


class JetMoeForCausalLM(JetMoePreTrainedModel):
    """Language model head (tied to the embeddings by default) and the training loss:
    CE + aux_loss_coef · load-balancing + router_z_loss_coef · z-loss."""

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
        cache: KVCache | None = None,
        skip_logits: bool = False,
    ) -> MoeCausalLMOutputWithPast:
        """transformers' arguments, plus `skip_logits`: return no logits (`out.logits` is None) and, with `labels`,
        compute the CE fused with the LM head chunk by chunk (`losses.linear_cross_entropy`), so the `[B, T, V]`
        logits and their gradient are never materialised. Same loss; what training wants."""
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            cache_position=cache_position, cache=cache,
        )
        h_BTD = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            h_BTD = h_BTD[:, -logits_to_keep:] if logits_to_keep else h_BTD
        else:
            h_BTD = h_BTD[:, logits_to_keep]
        logits_BTV = None if skip_logits else linear(h_BTD, self.lm_head.weight)

        aux_loss = z_loss = None
        if self.training or output_router_logits:
            # Padding is left out of the routing statistics (only a 2-D mask says what padding is).
            mask_N = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
            if mask_N is not None and mask_N.shape[-1] != h_BTD.shape[1]:
                mask_N = mask_N[:, -out.router_logits[0].shape[0] // mask_N.shape[0]:]
            aux_loss = load_balancing_loss(
                out.router_logits, self.config.num_experts_per_tok, mask_N, self.config.aux_loss_per_router
            )
            z_loss = router_z_loss(out.router_logits, mask_N)

        loss = ce_loss = None
        if labels is not None:
            if logits_BTV is None:
                ce_loss = linear_cross_entropy(h_BTD, self.lm_head.weight, labels)
            else:
                ce_loss = causal_lm_cross_entropy(logits_BTV, labels)
            loss = ce_loss
            if aux_loss is not None:
                loss = loss + self.config.aux_loss_coef * aux_loss + self.config.router_z_loss_coef * z_loss
        return MoeCausalLMOutputWithPast(
            loss=loss, aux_loss=aux_loss, logits=logits_BTV, past_key_values=out.past_key_values,
            hidden_states=out.hidden_states, attentions=out.attentions,
            router_logits=out.router_logits if output_router_logits else None, ce_loss=ce_loss, z_loss=z_loss,
        )

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Greedy (default) or sampled continuation with the KV cache; see `jetmoe.model.generation.generate`."""
        from jetmoe.model.generation import generate

        return generate(self, input_ids, **kwargs)


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
        else:  # last non-padding token (works for left and right padding)
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
    if on_host and input_ids.numel() and (
        int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size
    ):
        raise ValueError(
            f"input_ids must be in [0, vocab_size={vocab_size}), got values in "
            f"[{int(input_ids.min())}, {int(input_ids.max())}]"
        )
