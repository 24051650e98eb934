"""JetMoE: Mixture of Attention heads + Mixture of MLP experts."""
