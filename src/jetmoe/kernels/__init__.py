"""Fast kernels: the model's operations with hand-written backwards, fused passes and device-specific forms.

Each function here computes exactly what a reference operation of `jetmoe.model.ops.ReferenceOps` computes (same
arguments, same result up to rounding), faster. Nothing here imports the model: `jetmoe.model.ops` picks which
implementation a forward uses (`select_ops`, by `config.kernels`, device and dtype), and
tests/kernels/ checks every kernel against its reference, forward and gradients.

    fused.py           row permutations, token dispatch, the gated mix of expert outputs, SiLU-GLU, rotary,
                       RMSNorm: custom backwards that skip autograd's extra passes and allocations
    grouped_mm.py      all experts' products in one sync-free grouped GEMM (`torch._grouped_mm`)
    cross_entropy.py   the LM head fused with a chunked fp32 cross-entropy: the logits never exist in full
    cpu/               CPU-only forms: blocked bf16 causal attention, bf16 matmuls in fp32 for CPUs without bf16
                       units, the few-row product form for decoding
"""
