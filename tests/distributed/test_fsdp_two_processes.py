"""FSDP2 on 2 CPU processes (gloo): sharding, meta init, loss parity with one process, sharded checkpoints,
resume in fresh processes, HF consolidation, and the same through Lightning's FSDP2Strategy.

Two spawns serve every test here (process start-up dominates the cost): `first_run` and, in fresh
processes, `resumed_run` (see fsdp_workers.py).
"""

from __future__ import annotations

import fsdp_workers as w
import pytest
import torch

from jetmoe import JetMoeForCausalLM, load_pretrained
from jetmoe.distributed import consolidate

pytestmark = pytest.mark.distributed
transformers = pytest.importorskip("transformers")

LOSS_TOL = 1e-5  # fp32: the sharded and the single-process runs differ only in reduction order


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    first = w.spawn(w.first_run, out)
    resumed = w.spawn(w.resumed_run, out)
    history, model = w.reference()
    return {"out": out, "first": first, "resumed": resumed, "reference": history, "reference_model": model}


def _assert_histories_close(actual, expected):
    assert len(actual) == len(expected)
    for step, (a, e) in enumerate(zip(actual, expected, strict=True)):
        for name in w.METRICS:
            assert a[name] == pytest.approx(e[name], abs=LOSS_TOL), f"step {step + 1} {name}: {a[name]} vs {e[name]}"


def test_parameters_are_dtensors_sharded_over_both_ranks(runs):
    placements = runs["first"][0]["placements"]
    assert placements, "no parameters"
    for name, (kind, placement, mesh_size) in placements.items():
        assert (kind, placement, mesh_size) == ("DTensor", "(Shard(dim=0),)", 2), name
    # Each rank holds half of the parameters and of the AdamW states (shards partition the tensors).
    full = w.reference(steps=1)[1]
    full_bytes = sum(p.numel() * p.element_size() for p in full.parameters())
    per_rank = [r["state_bytes"] for r in runs["first"]]
    assert sum(b["params"] for b in per_rank) == full_bytes
    for b in per_rank:
        assert 0.4 * full_bytes < b["params"] < 0.6 * full_bytes
        assert b["optimizer"] == pytest.approx(2 * b["params"], rel=0.01)  # exp_avg + exp_avg_sq (+ step)


def test_meta_init_equals_unsharded_init(runs):
    torch.manual_seed(w.SEED)
    with torch.device("meta"):
        expected = JetMoeForCausalLM(w.CONFIG)
    expected.to_empty(device="cpu")
    expected.tie_weights()
    expected.init_weights()
    gathered = runs["first"][0]["init"]
    assert gathered.keys() == expected.state_dict().keys()
    for name, tensor in expected.state_dict().items():
        torch.testing.assert_close(gathered[name], tensor, rtol=0, atol=0, msg=name)
    assert torch.equal(gathered["lm_head.weight"], gathered["model.embed_tokens.weight"])  # still tied


def test_loss_matches_single_process_run(runs):
    """Loss, CE, load-balancing and z-loss averaged over ranks equal the single-process run that averages
    the two local batches' losses (the load-balancing loss is per local batch in both)."""
    _assert_histories_close(runs["first"][0]["uninterrupted"], runs["reference"])
    assert runs["first"][0]["uninterrupted"] == runs["first"][1]["uninterrupted"]  # all-reduced: global
    init, trained = runs["first"][0]["init"], runs["reference_model"].state_dict()
    assert (trained["model.embed_tokens.weight"] - init["model.embed_tokens.weight"]).abs().max() > 1e-2  # it trains


def test_hf_export_of_a_sharded_model_loads_in_transformers(runs):
    """The rank-0 HF export of a sharded model after two steps: transformers loads it, with the weights and the
    logits of the single-process run."""
    out = runs["out"] / "hf_step2"
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors"}
    hf, info = transformers.JetMoeForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    _, after_two_steps = w.reference(steps=2)
    ids = w.global_batches()[0]
    with torch.no_grad():
        expected = after_two_steps.eval()(ids).logits
        torch.testing.assert_close(hf.eval()(ids).logits, expected, atol=1e-4, rtol=0)


def test_hf_weights_load_into_a_sharded_model(runs):
    exported = load_pretrained(runs["out"] / "hf_step2").state_dict()
    loaded = runs["resumed"][0]["from_hf"]
    assert loaded.keys() == exported.keys()
    for name, tensor in exported.items():
        assert torch.equal(loaded[name], tensor), name


def test_lightning_fsdp2_strategy_trains_saves_and_resumes_like_the_reference(runs, tmp_path):
    first, resumed = runs["first"][0]["lightning"], runs["resumed"][0]["lightning"]
    assert first["mesh_shape"] == (2, 1)  # data_parallel = world size, tensor_parallel = 1
    assert first["embed_placements"] == "(Shard(dim=0),)"
    _assert_histories_close(first["history"] + resumed["history"], runs["reference"])
    # Lightning's sharded last.ckpt/ consolidates to the weights the run ended with.
    consolidate(runs["out"] / "lightning" / "last.ckpt", tmp_path, w.CONFIG)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors"}
    exported = load_pretrained(tmp_path).state_dict()
    for name, tensor in exported.items():
        assert torch.equal(resumed["full"][name], tensor), name
