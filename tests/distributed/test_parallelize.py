"""parallelize_jetmoe in one process (a 1-rank gloo group): wrapping order, precision, options, errors."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from jetmoe import JetMoeConfig, JetMoeForCausalLM
from jetmoe.distributed import build_sharded_causal_lm, parallelize_jetmoe
from jetmoe.distributed.mesh import data_parallel_mesh
from jetmoe.distributed.strategy import FSDP2Strategy


@pytest.fixture(scope="module")
def mesh():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


@pytest.fixture
def config() -> JetMoeConfig:
    return JetMoeConfig.from_name("test", pad_token_id=0, num_hidden_layers=4)


def _loss(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(5))
    return model(ids, labels=ids).loss


@pytest.mark.parametrize(("mode", "checkpointed"), [("none", []), ("full", [0, 1, 2, 3]), ("selective", [0, 2])])
def test_blocks_are_checkpointed_then_sharded(mesh, config, mode, checkpointed):
    model = build_sharded_causal_lm(config, mesh, "cpu", activation_checkpointing=mode)
    layers = model.model.layers
    assert [i for i, block in enumerate(layers) if isinstance(block, CheckpointWrapper)] == checkpointed
    assert all(isinstance(block, FSDPModule) for block in layers)
    assert isinstance(model, FSDPModule)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert isinstance(model.lm_head.weight, DTensor)


def test_sharded_model_computes_the_unsharded_loss_and_gradients(mesh, config):
    torch.manual_seed(0)
    plain = JetMoeForCausalLM(config)
    torch.manual_seed(0)
    sharded = build_sharded_causal_lm(config, mesh, "cpu", activation_checkpointing="full")
    expected, actual = _loss(plain), _loss(sharded)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)
    expected.backward()
    actual.backward()
    grad = sharded.model.layers[1].mlp.input_linear.weight.grad
    expected_grad = plain.model.layers[1].mlp.input_linear.weight.grad
    torch.testing.assert_close(grad.full_tensor(), expected_grad, atol=1e-7, rtol=0)


def test_compile_wraps_the_checkpointed_block(mesh, config, monkeypatch):
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))  # no C++ build
    torch.manual_seed(0)
    eager = _loss(build_sharded_causal_lm(config, mesh, "cpu"))
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_sharded_causal_lm(config, mesh, "cpu", activation_checkpointing="full", compile=True)
    block = model.model.layers[0]
    assert isinstance(block, torch._dynamo.eval_frame.OptimizedModule) and isinstance(block, FSDPModule)
    assert isinstance(block._orig_mod, CheckpointWrapper)
    loss = _loss(model)
    loss.backward()
    torch.testing.assert_close(loss, eager, rtol=0, atol=1e-6)
    torch._dynamo.reset()


def test_bf16_mixed_keeps_fp32_shards_and_computes_in_bf16(mesh, config):
    model = build_sharded_causal_lm(config, mesh, "cpu", precision="bf16-mixed")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    policy = model.model.layers[0]._get_fsdp_state()._mp_policy
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    ids = torch.randint(0, 128, (2, 8))
    out = model(ids, labels=ids, skip_logits=False)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert model.model.embed_tokens.weight.grad.dtype == torch.float32


def test_bf16_true_stores_bf16_parameters(mesh, config):
    model = build_sharded_causal_lm(config, mesh, "cpu", precision="bf16-true")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.isfinite(_loss(model))


def test_cpu_offload_trains(mesh, config):
    model = build_sharded_causal_lm(config, mesh, "cpu", cpu_offload=True, reshard_after_forward=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = model.model.embed_tokens.weight.full_tensor().clone()
    _loss(model).backward()
    opt.step()
    assert not torch.equal(model.model.embed_tokens.weight.full_tensor(), before)


def test_lightning_mesh_shards_over_its_data_parallel_dim(mesh):
    lightning_mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    assert data_parallel_mesh(lightning_mesh) == lightning_mesh["data_parallel"]


def test_rejects_tensor_parallel_meshes_and_double_checkpointing(mesh, config):
    with torch.device("meta"):
        model = JetMoeForCausalLM(config)
    tp_mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel", "expert"))
    with pytest.raises(ValueError, match="tensor parallelism is not supported"):
        parallelize_jetmoe(model, tp_mesh)
    with pytest.raises(ValueError, match="precision must be one of"):
        parallelize_jetmoe(model, mesh, precision="16-mixed")
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="use either gradient_checkpointing_enable"):
        parallelize_jetmoe(model, mesh, activation_checkpointing="full")


def test_lightning_precision_plugins_are_refused():
    strategy = FSDP2Strategy()
    strategy.precision_plugin = MixedPrecision("bf16-mixed", "cpu")
    with pytest.raises(ValueError, match="precision='32-true'"):
        strategy.setup(trainer=None)
