"""The fused operations against the reference ones, through the whole model (forward, loss and every gradient), and
the rule that picks them."""

import pytest
import torch
import torch.nn.functional as F
from model_helpers import use_ops
from numerics import relative_error

from jetmoe import JetMoeConfig, JetMoeForCausalLM
from jetmoe.kernels.cpu.bf16 import has_bf16_units
from jetmoe.model import backends
from jetmoe.model.backends import CpuBf16Ops, CpuOps, CpuUpcastOps, FusedOps, select_ops
from jetmoe.model.ops import ReferenceOps


def _twins(config, dtype):
    torch.manual_seed(0)
    fast = JetMoeForCausalLM(config).to(dtype).train()
    reference = JetMoeForCausalLM(config.replace(kernels="reference")).to(dtype).train()
    reference.load_state_dict(fast.state_dict())
    return fast, reference


def _step(model, ids):
    out = model(ids, labels=ids, skip_logits=False)
    out.loss.backward()
    return out, {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("ops_class, dtype", [
    (FusedOps, torch.float32), (CpuOps, torch.float32), (CpuBf16Ops, torch.bfloat16), (CpuUpcastOps, torch.bfloat16),
])
@pytest.mark.parametrize("tokens", [8, 24])  # 2 x 8 x top-2 = 32 routed rows: CpuOps' per-expert loop; 96: grouped
@pytest.mark.parametrize("expert_impl", ["auto", "loop"])
def test_fused_model_equals_reference_model(ops_class, dtype, tokens, expert_impl, tiny_config):
    fast, reference = _twins(tiny_config, dtype)
    use_ops(fast, ops_class(expert_impl))
    ids = torch.randint(0, 128, (2, tokens))
    out, g = _step(fast, ids)
    out_ref, g_ref = _step(reference, ids)
    if dtype == torch.float32:
        for name in ("loss", "aux_loss", "z_loss", "logits"):
            torch.testing.assert_close(getattr(out, name), getattr(out_ref, name), atol=1e-5, rtol=1e-5, msg=name)
        for name in g:
            torch.testing.assert_close(g[name], g_ref[name], atol=1e-6, rtol=1e-4, msg=name)
        return
    # bf16: both round differently; each is compared with the fp32 model of the same weights, and the fused one
    # may be off by at most twice the reference's own error (plus bf16's resolution).
    exact = JetMoeForCausalLM(tiny_config.replace(kernels="reference")).train()
    exact.load_state_dict({k: v.float() for k, v in reference.state_dict().items()})
    out_32, g_32 = _step(exact, ids)
    pairs = [("logits", out.logits, out_ref.logits, out_32.logits)]
    pairs += [(name, g[name], g_ref[name], g_32[name]) for name in g]
    for name, a, a_ref, truth in pairs:
        assert relative_error(a, truth) <= 2 * relative_error(a_ref, truth) + 1e-2, name


def test_the_fused_lm_head_loss_is_the_default_when_training_with_labels(tiny_config):
    fast, reference = _twins(tiny_config, torch.float32)
    ids = torch.randint(0, 128, (2, 12))
    out = fast(ids, labels=ids)
    assert out.logits is None  # skipped: the CE fused with the LM head
    out_ref = reference(ids, labels=ids)
    torch.testing.assert_close(out.loss, out_ref.loss)
    assert fast.eval()(ids, labels=ids).logits is not None  # evaluation keeps the logits
    assert fast.train()(ids, labels=ids, skip_logits=False).logits is not None


def test_select_ops_follows_the_documented_table():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert type(select_ops("reference", "auto", cpu, torch.float32)) is ReferenceOps
    assert type(select_ops("reference", "auto", cuda, torch.bfloat16)) is ReferenceOps
    assert type(select_ops("fused", "auto", cuda, torch.bfloat16)) is FusedOps
    assert type(select_ops("fused", "auto", cpu, torch.float32)) is CpuOps
    bf16 = select_ops("fused", "loop", cpu, torch.bfloat16)
    assert type(bf16) is (CpuBf16Ops if has_bf16_units() else CpuUpcastOps) and bf16.expert_impl == "loop"
    assert type(select_ops("fused", "auto", cpu, torch.float16)) is CpuOps


def test_expert_impl_decides_the_grouped_gemm():
    x, w = torch.randn(4, 8), torch.randn(2, 16, 8)
    assert FusedOps("auto").grouped(x, w) and FusedOps("grouped").grouped(x, w)
    assert not FusedOps("loop").grouped(x, w)
    assert not FusedOps("auto").grouped(x, torch.randn(2, 16, 5))  # rows of 5 fp32 break the 16-byte rule


def test_blocked_attention_takes_causal_self_attention_only(monkeypatch):
    calls = []
    monkeypatch.setattr(backends, "causal_attention", lambda *a: calls.append(1) or F.scaled_dot_product_attention(
        *a, is_causal=True, enable_gqa=True))
    ops = CpuBf16Ops()
    q, k = torch.randn(1, 4, 6, 8).bfloat16(), torch.randn(1, 2, 6, 8).bfloat16()
    ops.attention(q, k, k, None, 0.0)
    assert calls == [1]
    ops.attention(q, k, k, None, 0.1)  # dropout
    ops.attention(q, k, k, torch.ones(6, 6, dtype=torch.bool).tril(), 0.0)  # a mask
    ops.attention(q[:, :, :1], k, k, None, 0.0)  # one query row over a cache
    assert calls == [1]


def test_unaligned_widths_fall_back_to_the_loop():
    config = JetMoeConfig.from_name("test", hidden_size=30, kv_channels=6, intermediate_size=10)
    model = JetMoeForCausalLM(config).train()
    ids = torch.randint(0, 128, (4, 12))
    model(ids, labels=ids).loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
