"""The model's tensor operations in their reference form: plain PyTorch, autograd's own backward.

The model calls these through an `Ops` object (`model.model` passes it down from `select_ops`): this class is the
`reference` implementation, the one every fast kernel is tested against, and `jetmoe.model.backends` holds the
`fused` ones, which override methods with the kernels of `jetmoe.kernels`. Nothing here depends on the device,
the dtype, the grad mode or compilation.

Shape letters: B batch, T query positions, S key positions, N = B·T tokens, k experts per token, M = N·k routed
rows, E experts, D model width, F expert hidden width, H key/value heads, Q = H·k query heads, Dh head dim,
A = H·Dh one attention expert's width, V vocabulary, I/O a matrix's input/output width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from jetmoe.losses import causal_lm_cross_entropy
from jetmoe.model.routing import Routing


class ReferenceOps:
    """Each operation written as its definition."""

    name = "reference"

    # ------------------------------------------------------------------ dense layers
    def linear(self, x: torch.Tensor, w_OI: torch.Tensor) -> torch.Tensor:
        """`x @ w^T` (no bias)."""
        return F.linear(x, w_OI)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """transformers' JetMoeRMSNorm: normalised in fp32, rounded to x's dtype, then scaled."""
        x32 = x.float()
        return weight * (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)).to(x.dtype)

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE: `x * cos + rotate_half(x) * sin` with `rotate_half(x) = (-x2, x1)` (cos/sin broadcast against x)."""
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    def glu(self, h_M2F: torch.Tensor, activation: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """`act(gate) * up` for `h = (gate | up)`."""
        gate_MF, up_MF = h_M2F.chunk(2, dim=-1)
        return activation(gate_MF) * up_MF

    # ------------------------------------------------------------------ experts: dispatch, compute, combine
    def dispatch(self, x_ND: torch.Tensor, routing: Routing) -> torch.Tensor:
        """`[N, D]` tokens -> `[M, D]` routed rows sorted by expert: each token copied to its k rows."""
        return x_ND[routing.token_M]

    def expert_linear(self, x_MI: torch.Tensor, w_EOI: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Sorted rows times their expert's weight: expert e's `counts_E[e]` consecutive rows times `w_EOI[e]^T`.
        One product per expert, with the counts read on the host (a device synchronisation). Of `routing`, this
        and every override read only the row groups, `counts_E` and `offsets_E`."""
        chunks = x_MI.split(routing.counts_E.tolist())
        return torch.cat([self.linear(chunk_I, w_EOI[e]) for e, chunk_I in enumerate(chunks)])

    def expert_mlp(
        self, x_MD: torch.Tensor, w_E2FD: torch.Tensor, w_EDF: torch.Tensor,
        activation: Callable[[torch.Tensor], torch.Tensor], routing: Routing,
    ) -> torch.Tensor:
        """The GLU MLP experts on sorted rows: `w_EDF · glu(w_E2FD · x)` per expert. One operation for the whole
        MLP, so that expert parallelism exchanges its rows once (`jetmoe.distributed.expert_parallel`)."""
        h_M2F = self.expert_linear(x_MD, w_E2FD, routing)
        return self.expert_linear(self.glu(h_M2F, activation), w_EDF, routing)

    def combine(self, y_MD: torch.Tensor, routing: Routing, bias_D: torch.Tensor) -> torch.Tensor:
        """`[M, D]` sorted expert outputs -> `[N, D]`: each token's k outputs weighted by its gates and summed,
        plus the layer's output bias."""
        y_MD = y_MD * routing.gates_M[:, None]
        out_ND = torch.zeros(routing.experts_Nk.shape[0], y_MD.shape[-1], dtype=y_MD.dtype, device=y_MD.device)
        return out_ND.index_add(0, routing.token_M, y_MD) + bias_D

    def to_heads(self, q_MA: torch.Tensor, routing: Routing, num_heads: int) -> torch.Tensor:
        """MoA queries, `[M, A]` sorted rows -> `[N, H·k, Dh]` attention heads, query head h·k + j being head h of
        the token's j-th expert (so that it attends with key/value head h)."""
        k = routing.top_k
        q_NkHD = q_MA[routing.rank_M].view(-1, k, num_heads, q_MA.shape[-1] // num_heads)
        return q_NkHD.transpose(1, 2).flatten(1, 2)

    def from_heads(self, o_NQD: torch.Tensor, routing: Routing, num_heads: int) -> torch.Tensor:
        """The inverse of `to_heads`: `[N, H·k, Dh]` attention outputs -> `[M, A]` rows sorted by expert."""
        N, _, Dh = o_NQD.shape
        o_NkA = o_NQD.view(N, num_heads, routing.top_k, Dh).transpose(1, 2).reshape(-1, num_heads * Dh)
        return o_NkA[routing.slot_M]

    # ------------------------------------------------------------------ attention and the loss
    def attention(
        self, q_BQTD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, mask: torch.Tensor | None,
        dropout: float,
    ) -> torch.Tensor:
        """Grouped-query attention (query head i uses key/value head i // k), default scale; `mask` boolean
        (True: attend) or additive, or None for plain causal attention."""
        is_causal = mask is None and q_BQTD.shape[2] > 1
        return F.scaled_dot_product_attention(
            q_BQTD, k_BHSD, v_BHSD, attn_mask=mask, dropout_p=dropout, is_causal=is_causal, enable_gqa=True
        )

    def lm_head_loss(self, h_BTD: torch.Tensor, w_VD: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy of the LM head's logits `h @ w^T` (fp32)."""
        return causal_lm_cross_entropy(self.linear(h_BTD, w_VD), labels_BT)
