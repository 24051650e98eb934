"""JetMoeConfig: the Hugging Face JetMoe fields and defaults, validation, presets, parameter counts."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from jetmoe.errors import ConfigError, check_choice

ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "relu")
KERNELS = ("reference", "fused")  # see jetmoe.model.backends
BALANCING = ("aux_global", "aux_per_router", "bias", "none")  # see JetMoeConfig
EXPERT_IMPLS = ("auto", "grouped", "loop")
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")  # of a training run (Lightning's names; FSDP2's policies)
PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")

# Keys that transformers writes into config.json but that carry no model information for us.
_HF_BOOKKEEPING = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
    "id2label", "label2id", "return_dict", "output_hidden_states", "output_attentions", "chunk_size_feed_forward",
    "is_encoder_decoder", "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params",
    "problem_type_", "_attn_implementation_autoset", "head_dim", "num_attention_heads", "rope_scaling",
}


@dataclass
class JetMoeConfig:
    """Configuration of a JetMoE model.

    Field names and defaults are those of `transformers.JetMoeConfig`, so a `config.json` written by either
    library loads in the other. Beyond transformers:

    - `router_z_loss_coef`: weight of the router z-loss (0 keeps the numbers transformers-identical);
    - `balancing`: how the routers are kept balanced; `aux_loss_coef` weighs the auxiliary loss of each method
      (`jetmoe.losses`):
        - `aux_global`: transformers' load-balancing loss, f and P averaged over all routers, then multiplied;
        - `aux_per_router`: the JetMoE paper's, each router's loss on its own, averaged over routers;
        - `bias`: auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias, added to the router logits for
          the choice of experts only (the gates come from the logits), moved by
          `bias_update_rate · sign(mean load - load)` after every optimizer step; the auxiliary loss beside it is
          the sequence-wise one (each packed row's own balance; DeepSeek-V3 weighs it 1e-4, 0 turns it off);
        - `none`: no balancing (the auxiliary loss is 0);
    - `capacity_factor`: while training, each expert takes at most `ceil(factor · N · k / E)` of a batch's N·k
      routed rows, first choices first; the rows past it are dropped (their gate is 0: the token keeps its
      residual). None (default): dropless. Evaluation and generation are always dropless;
    - `router_force_uniform`: assign experts round robin whatever the logits (throughput measurements with perfect
      balance, as Megatron's and torchtitan's force-balance modes); the gates still come from the logits;
    - `kernels`: `fused` (default) runs the fast kernels of `jetmoe.kernels`, `reference` the plain-PyTorch
      definitions they are tested against (`jetmoe.model.backends` has the table of what runs where);
    - `expert_impl`: how `fused` multiplies the experts: `grouped` (one grouped GEMM for all experts, no host
      synchronisation), `loop` (one GEMM per expert, counts read on the host), `auto` (grouped where torch runs
      it for the device and dtype and the weights meet its alignment);
    - `num_labels` / `problem_type`: sequence classification.

    Invalid values raise `jetmoe.errors.ConfigError` (a ValueError) naming the field.
    """

    vocab_size: int = 32000
    hidden_size: int = 2048
    num_hidden_layers: int = 12
    num_key_value_heads: int = 16
    kv_channels: int = 128
    intermediate_size: int = 5632
    max_position_embeddings: int = 4096
    activation_function: str = "silu"
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    output_router_logits: bool = False
    aux_loss_coef: float = 0.01
    use_cache: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.01
    attention_dropout: float = 0.0
    # Beyond transformers.
    router_z_loss_coef: float = 0.0
    balancing: str = "aux_global"
    bias_update_rate: float = 1e-3
    capacity_factor: float | None = None
    router_force_uniform: bool = False
    kernels: str = "fused"
    expert_impl: str = "auto"
    num_labels: int = 2
    problem_type: str | None = None
    rope_parameters: dict[str, Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.rope_parameters is not None:  # transformers >= 5 spelling
            self.rope_theta = self.rope_parameters.get("rope_theta", self.rope_theta)
            rope_type = self.rope_parameters.get("rope_type", "default")
            if rope_type != "default":
                raise ConfigError(f"rope_parameters.rope_type must be 'default', got {rope_type!r}")
        self.validate()
        self.rope_theta = float(self.rope_theta)
        self.rope_parameters = {"rope_theta": self.rope_theta, "rope_type": "default"}

    # ------------------------------------------------------------------ derived
    @property
    def num_attention_heads(self) -> int:
        return self.num_key_value_heads * self.num_experts_per_tok

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ConfigError naming the first invalid field."""
        positive = (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_key_value_heads", "kv_channels",
            "intermediate_size", "max_position_embeddings", "num_local_experts", "num_experts_per_tok", "num_labels",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ConfigError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be <= num_local_experts "
                f"({self.num_local_experts})"
            )
        if self.kv_channels % 2:
            raise ConfigError(f"kv_channels must be even for rotary embeddings, got {self.kv_channels}")
        check_choice("activation_function", self.activation_function, ACTIVATIONS)
        check_choice("kernels", self.kernels, KERNELS)
        check_choice("expert_impl", self.expert_impl, EXPERT_IMPLS)
        check_choice("problem_type", self.problem_type, PROBLEM_TYPES)
        for name in ("rope_theta", "rms_norm_eps", "initializer_range"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        for name in ("aux_loss_coef", "router_z_loss_coef"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be a non-negative number, got {value!r}")
        check_choice("balancing", self.balancing, BALANCING)
        rate = self.bias_update_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate < 0:
            raise ConfigError(f"bias_update_rate must be a non-negative number, got {rate!r}")
        factor = self.capacity_factor
        if factor is not None and (
            isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor <= 0
        ):
            raise ConfigError(f"capacity_factor must be a positive number or null (dropless), got {factor!r}")
        if not isinstance(self.router_force_uniform, bool):
            raise ConfigError(f"router_force_uniform must be true or false, got {self.router_force_uniform!r}")
        dropout = self.attention_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ConfigError(f"attention_dropout must be in [0, 1), got {dropout!r}")
        ids = [("bos_token_id", self.bos_token_id), ("pad_token_id", self.pad_token_id)]
        ids += [("eos_token_id", eos) for eos in self.eos_token_ids]
        for name, value in ids:
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.vocab_size
            ):
                raise ConfigError(f"{name} must be an integer in [0, vocab_size={self.vocab_size}), got {value!r}")

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    @property
    def transformers_routes_alike(self) -> bool:
        """Whether transformers' JetMoe, which knows none of these options, routes a trained model as jetmoe does
        (the capacity factor only acts while training)."""
        return self.balancing != "bias" and not self.router_force_uniform

    # ------------------------------------------------------------------ parameter counts
    def num_parameters(self) -> dict[str, int]:
        """Total and active (per token) parameter counts, embeddings included (tied: counted once)."""
        d, E, k = self.hidden_size, self.num_local_experts, self.num_experts_per_tok
        attn_width = self.num_key_value_heads * self.kv_channels
        moa_expert = 2 * d * attn_width  # query + output projection of one attention expert
        moe_expert = 3 * d * self.intermediate_size  # GLU input (2F x d) + output (d x F)
        shared = 2 * d * attn_width + 2 * E * d + 2 * d + 2 * d  # kv_proj, 2 routers, 2 biases, 2 norms
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2) + d  # + final norm
        total = embed + self.num_hidden_layers * (shared + E * (moa_expert + moe_expert))
        active = embed + self.num_hidden_layers * (shared + k * (moa_expert + moe_expert))
        return {"total": total, "active": active}

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """A dict that `transformers.JetMoeConfig(**d)` accepts (and `config.json` content)."""
        out = dataclasses.asdict(self)
        out["model_type"] = "jetmoe"
        out["num_attention_heads"] = self.num_attention_heads
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "JetMoeConfig":
        """Build from a dict (ours or a transformers `config.json`); unknown keys raise ConfigError."""
        d = upgrade_legacy_keys(d)
        model_type = d.get("model_type", "jetmoe")
        if model_type != "jetmoe":
            raise ConfigError(f"model_type must be 'jetmoe', got {model_type!r}")
        if "id2label" in d and "num_labels" not in d:
            d["num_labels"] = len(d["id2label"])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in known and k not in _HF_BOOKKEEPING)
        if unknown:
            raise ConfigError(f"unknown JetMoeConfig field(s): {', '.join(unknown)}")
        return cls(**{k: v for k, v in d.items() if k in known})

    def replace(self, **changes: Any) -> "JetMoeConfig":
        """A copy with some fields changed (validated)."""
        changes.setdefault("rope_parameters", None)
        if "rope_theta" not in changes:
            changes["rope_theta"] = self.rope_theta
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "JetMoeConfig":
        """A named preset: 'test' (unit tests), 'small' (CPU-trainable), 'jetmoe-8b' (the published model)."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
        return cls(**{**PRESETS[name], **overrides})


def upgrade_legacy_keys(d: dict[str, Any]) -> dict[str, Any]:
    """A copy of a config dict with keys of earlier versions renamed: `aux_loss_per_router` (true / false) is
    `balancing` (`aux_per_router` / `aux_global`)."""
    d = dict(d)
    if "aux_loss_per_router" in d:
        per_router = d.pop("aux_loss_per_router")
        d.setdefault("balancing", "aux_per_router" if per_router else "aux_global")
    return d


PRESETS: dict[str, dict[str, Any]] = {
    # A few hundred thousand parameters: every unit test runs on it in milliseconds.
    "test": dict(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_key_value_heads=2, kv_channels=16,
        intermediate_size=64, max_position_embeddings=256, num_local_experts=4, num_experts_per_tok=2,
    ),
    # A few million parameters, trains on 2 CPU cores in minutes (the default experiment).
    "small": dict(
        vocab_size=4096, hidden_size=128, num_hidden_layers=4, num_key_value_heads=4, kv_channels=32,
        intermediate_size=256, max_position_embeddings=1024, num_local_experts=8, num_experts_per_tok=2,
    ),
    # JetMoE-8B (Shen et al. 2024): 24 layers, 8 experts top-2 in MoA and MoE, 16 KV heads x 128.
    "jetmoe-8b": dict(
        vocab_size=32000, hidden_size=2048, num_hidden_layers=24, num_key_value_heads=16, kv_channels=128,
        intermediate_size=5632, max_position_embeddings=4096, num_local_experts=8, num_experts_per_tok=2,
    ),
}
