"""Expert parallelism on 2 CPU processes (gloo), EP = 2: the loss, every gradient, the clipped norm and one AdamW
step equal one process training the whole model on the same global batch (4 and 8 experts, MoA sharded or not,
checkpointed blocks, an uneven routing); Lightning's FSDP2Strategy trains with it, saves, and resumes with EP = 1
in fresh processes; the checkpoint consolidates into the HF layout, and is refused for another expert count.

Two spawns serve every test (see ep_workers.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import ep_workers as e
import fsdp_workers as w
import pytest
import torch

from jetmoe import JetMoeForCausalLM, load_pretrained
from jetmoe.cli import main
from jetmoe.distributed import consolidate
from jetmoe.distributed.checkpoint import check_tensor_shapes
from jetmoe.distributed.plan import communication_bytes
from jetmoe.errors import InputFileError
from jetmoe.training.config import load_config, to_yaml

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[2]
TOL = 1e-5  # fp32: EP changes only the order of reductions


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep")
    first = w.spawn(e.first_run, out)
    resumed = w.spawn(e.resumed_without_ep, out)
    return {"out": out, "first": first, "resumed": resumed}


@pytest.fixture(scope="module")
def references():
    return {name: e.reference(name) for name in e.CASES}


@pytest.mark.parametrize("case", list(e.CASES))
def test_loss_gradients_and_one_step_equal_one_process(runs, references, case):
    assert runs["first"][1]["cases"][case]["terms"] == runs["first"][0]["cases"][case]["terms"]  # all-reduced
    _assert_equal_to_one_process(runs["first"][0]["cases"][case], references[case])


def _assert_equal_to_one_process(got, expected):
    for name, value in expected["terms"].items():
        assert got["terms"][name] == pytest.approx(value, abs=TOL), name
    assert got["grads"].keys() == expected["grads"].keys()
    for name, grad in expected["grads"].items():
        torch.testing.assert_close(got["grads"][name], grad, atol=TOL, rtol=0, msg=name)
    assert got["norm"] == pytest.approx(expected["norm"], rel=1e-6) and got["norm"] > 10 * e.MAX_NORM  # clipped
    for name, weight in expected["weights"].items():
        torch.testing.assert_close(got["weights"][name], weight, atol=TOL, rtol=0, msg=name)


def test_experts_are_split_by_expert_over_the_ep_group(runs):
    placements = runs["first"][0]["cases"]["8 experts, MoA sharded, selective checkpointing"]["placements"]
    for name, (placement, dims, local_shape) in placements.items():
        if "input_linear" in name or "output_linear" in name:  # MoE and (sharded) MoA experts: 4 of 8 per rank
            assert dims == ("expert_data_parallel", "expert_parallel") and local_shape[0] == 4, name
            assert placement.endswith("Shard(dim=0))"), name
        else:  # everything else: FSDP over both ranks
            assert (placement, dims) == ("(Shard(dim=0),)", ("data_parallel",)), name
    unsharded_moa = runs["first"][0]["cases"]["4 experts"]["placements"]["model.layers.0.self_attention.experts.input_linear.weight"]
    assert unsharded_moa[1] == ("data_parallel",)


def test_uneven_routing_a_rank_sends_everything_away_and_experts_receive_nothing(runs):
    """Block 0's MoA and MoE exchanges (the first two) of the uneven case: every row of both ranks goes to the two
    experts of one EP rank; the other rank's experts get no row, and its own rows all travel and come back."""
    name = "uneven: block 0 routes every token to the same two experts"
    rank0, rank1 = (runs["first"][r]["cases"][name]["exchanges"][:2] for r in (0, 1))
    rows = 2 * w.LOCAL_BATCH * w.SEQ  # top-2: two routed rows per token and rank
    for exchange in zip(rank0, rank1, strict=True):
        busy = 0 if sum(exchange[0][1]) else 1
        idle = 1 - busy
        for send_splits, _, _ in exchange:
            assert send_splits[busy] == rows and send_splits[idle] == 0
        assert exchange[idle][1:] == ([0, 0], [0, 0])  # nothing received, both local experts empty
        assert exchange[busy][1:] == ([rows, rows], [rows, rows])  # each expert: one row of every token


def test_lightning_trains_with_ep_and_resumes_without_it(runs):
    first, resumed = runs["first"][0]["lightning"], runs["resumed"][0]["lightning"]
    assert first["mesh_shape"] == (1, 2) and resumed["mesh_shape"] == (2, 1)
    history = first["history"] + resumed["history"]
    expected = w.reference()[0]
    assert len(history) == len(expected)
    for step, (a, b) in enumerate(zip(history, expected, strict=True)):
        for name in w.METRICS:
            assert a[name] == pytest.approx(b[name], abs=TOL), f"step {step + 1} {name}"


def test_hf_export_of_an_ep_model_loads_in_transformers_and_back(runs):
    """`save_hf` of a model whose MoE and MoA experts are split over both ranks: transformers loads it and computes
    our logits; `load_hf_weights` puts it back into an EP model, bit for bit."""
    transformers = pytest.importorskip("transformers")
    hf_dir = runs["out"] / "hf_ep"
    hf, info = transformers.JetMoeForCausalLM.from_pretrained(hf_dir, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ours = load_pretrained(hf_dir)
    torch.manual_seed(w.SEED)
    torch.testing.assert_close(ours.state_dict(), JetMoeForCausalLM(w.CONFIG).state_dict(), rtol=0, atol=0)  # meta init
    ids = w.global_batches()[0]
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(ids).logits, ours.eval()(ids).logits, atol=1e-4, rtol=0)
    loaded = runs["resumed"][0]["from_hf"]
    assert loaded.keys() == ours.state_dict().keys()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(loaded[name], tensor), name


def test_an_ep_checkpoint_consolidates_and_refuses_another_expert_count(runs, tmp_path):
    ckpt = runs["out"] / "lightning" / "last.ckpt"
    consolidate(ckpt, tmp_path, w.CONFIG)
    exported = load_pretrained(tmp_path).state_dict()
    for name, tensor in exported.items():
        assert torch.equal(runs["resumed"][0]["lightning"]["full"][name], tensor), name
    key = "model.model.layers.0.mlp.input_linear.weight"
    with pytest.raises(InputFileError, match=rf"{key} is \[4, 128, 64\] in the checkpoint but \[8, 128, 64\]"):
        check_tensor_shapes(ckpt, {key: torch.Size([8, 128, 64])}, prefix="state_dict.")
    with pytest.raises(InputFileError, match=r"router.layer.weight is \[4, 64\] in the checkpoint but \[8, 64\]"):
        consolidate(ckpt, tmp_path / "other", w.CONFIG.replace(num_local_experts=8))


def test_consolidating_into_another_expert_count_is_one_line_exit_2(runs, tmp_path, capsys):
    """`jetmoe consolidate` of the EP checkpoint for a run whose config says 8 experts (the checkpoint has 4)."""
    run_dir = tmp_path / "run"
    shutil.copytree(runs["out"] / "lightning" / "last.ckpt", run_dir / "checkpoints" / "last.ckpt")
    cfg = load_config(REPO / "experiments/default.yaml", ["model=tiny", "model.vocab_size=128", "model.num_local_experts=8"])
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    assert main(["consolidate", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jetmoe: error: ") and "\n" not in err and "Traceback" not in err
    assert "model.layers.0.self_attention.experts.router.layer.weight is [4, 64] in the checkpoint but [8, 64]" in err
    assert not (run_dir / "hf").exists()


def test_the_plans_all_to_all_bytes_match_the_exchanges(runs):
    """`jetmoe plan`'s all-to-all bytes of the 4-expert case against its recorded exchanges: each sends a rank's
    rows to the other rank and their outputs back, and the backward reverses both (the plan assumes balanced
    routing, these are random routers)."""
    name, D = "4 experts", e.case_config("4 experts").hidden_size
    sent = [sum(2 * (send[1 - rank] + receive[1 - rank]) * D * 4
                for send, receive, _ in runs["first"][rank]["cases"][name]["exchanges"]) for rank in (0, 1)]
    planned = communication_bytes(e.case_config(name), tokens=w.LOCAL_BATCH * w.SEQ, gpus=2, precision="32-true",
                                  activation_checkpointing="none", expert_parallel=e.EP)["all_to_all"]
    assert sum(sent) / 2 == pytest.approx(planned, rel=0.2)


@pytest.mark.slow
def test_compiled_blocks_exchange_like_eager_ones(tmp_path):
    """torch.compile of the checkpointed blocks (graph breaks at each exchange, whose split sizes are read on the
    host): the eager loss and gradients."""
    result = w.spawn(e.compiled, tmp_path)[0]
    (eager_loss, eager_grad), (loss, grad) = result["eager"], result["compiled"]
    torch.testing.assert_close(loss, eager_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, eager_grad, atol=1e-7, rtol=0)


@pytest.mark.slow
def test_four_ranks_ep_2_by_data_parallel_2_shard_one_expert_per_rank_on_dim_1(tmp_path):
    """4 ranks, 2 experts, EP 2: each EP rank holds one expert, which FSDP shards over the 2 expert-data-parallel
    ranks on dim 1 (dim 0 would leave one of them empty). The step equals one process on the 4 ranks' rows, and
    the DCP checkpoint of this layout consolidates to the trained weights."""
    (name,) = e.FOUR_RANKS
    result = w.spawn(e.four_ranks, tmp_path, world=4)[0][name]
    _assert_equal_to_one_process(result, e.reference(name, world=4))
    placement, dims, local_shape = result["placements"]["model.layers.0.mlp.input_linear.weight"]
    assert (placement, dims, local_shape) == ("(Shard(dim=1), Shard(dim=0))", ("expert_data_parallel", "expert_parallel"),
                                              (1, 64, 64))  # [E/P, 2F/2, D]
    consolidate(tmp_path / "dcp", tmp_path / "hf", e.case_config(name))
    for key, tensor in load_pretrained(tmp_path / "hf").state_dict().items():
        assert torch.equal(tensor, result["weights"][key]), key
