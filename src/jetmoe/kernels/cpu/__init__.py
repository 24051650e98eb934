"""CPU-only kernels: blocked bf16 causal attention (`attention`), bf16 matmuls computed in fp32 on CPUs without bf16
units (`bf16`), and the few-row product form of decoding (`decode`). `jetmoe.model.ops` takes them for CPU tensors
only; the reference operations never import them."""
