"""Active-parameter matching: size the MLP experts so that models with different expert counts and
top-k do the same number of parameter-multiplies per token.

Per layer, a token uses k attention experts (query + output projections) and k GLU MLP experts, so
the active parameter count is affine in ``intermediate_size`` with slope ``3 * hidden_size * k *
num_hidden_layers``. Matching solves that line (read off ``JetMoeConfig.num_parameters``, so it
follows the counting rule rather than re-deriving it) for the nearest multiple of ``multiple_of``.
The attention experts are left as they are: with top-1 a token sees ``num_key_value_heads`` query
heads, with top-2 twice as many; the MLP absorbs the difference.
"""

from __future__ import annotations

from jetmoe.config import JetMoeConfig

DEFAULT_MULTIPLE_OF = 8  # keeps every expert row 16-byte aligned (grouped GEMM) in fp32 and bf16


def active_params(config: JetMoeConfig) -> int:
    return config.num_parameters()["active"]


def matched_intermediate_size(config: JetMoeConfig, target_active: int, multiple_of: int = DEFAULT_MULTIPLE_OF) -> int:
    """The multiple of ``multiple_of`` (at least ``multiple_of``) whose active count is closest to ``target_active``."""
    if multiple_of < 1:
        raise ValueError(f"multiple_of must be >= 1, got {multiple_of}")
    base = active_params(config.replace(intermediate_size=multiple_of))
    per_multiple = active_params(config.replace(intermediate_size=2 * multiple_of)) - base
    multiples = 1 + round((target_active - base) / per_multiple)
    return multiple_of * max(1, multiples)


def relative_gap(value: int, reference: int) -> float:
    """``value / reference - 1``: +0.01 is 1 % above the reference."""
    return value / reference - 1.0
