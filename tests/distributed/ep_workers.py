"""Worker phases of the expert-parallel tests (gloo on CPU, spawned by `fsdp_workers.spawn`) and their
single-process reference.

Each case builds the sharded model on an expert-parallel mesh, runs one step on this rank's rows of the global
batch (the loss, its gradients, the clipped norm, one AdamW step) and returns what the tests compare with one
process training the whole model on the same global batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fsdp_workers as w
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from jetmoe import JetMoeConfig, JetMoeForCausalLM
from jetmoe.distributed import build_sharded_causal_lm, clip_grad_norm_, full_state_dict, load_hf_weights, save_hf
from jetmoe.distributed import expert_parallel as ep
from jetmoe.distributed.mesh import expert_parallel_mesh

EP, MAX_NORM = 2, 0.05  # a max norm below the gradients' norm, so that clipping scales them
CASES = {  # name: config changes, parallelize options, routers of block 0 zeroed
    "4 experts": (dict(num_local_experts=4), dict(), False),
    "8 experts, MoA sharded, selective checkpointing": (
        dict(num_local_experts=8), dict(expert_parallel_attention=True, activation_checkpointing="selective"), False),
    "uneven: block 0 routes every token to the same two experts": (
        dict(num_local_experts=4), dict(expert_parallel_attention=True), True),
}
FOUR_RANKS = {  # one expert per EP rank, two expert-data-parallel ranks: FSDP shards the experts on dim 1
    "2 experts top-1 on 4 ranks, EP 2 x 2": (dict(num_local_experts=2, num_experts_per_tok=1),
                                             dict(expert_parallel_attention=True), False),
}
WRAPPERS = ("._checkpoint_wrapped_module", "._orig_mod")


def case_config(name: str) -> JetMoeConfig:
    return w.CONFIG.replace(**{**CASES, **FOUR_RANKS}[name][0])


def rank_rows(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    rows = batch.shape[0] // world
    return batch[rank * rows:(rank + 1) * rows]


def zero_block0_routers(model: nn.Module) -> None:
    """All router logits 0 in block 0: top-k of equal logits picks the same two experts for every token (torch's
    tie-break: those of one EP rank), so the other rank sends all its rows away and its experts receive none."""
    block = model.model.layers[0]
    with torch.no_grad():
        for router in (block.mlp.router, block.self_attention.experts.router):
            weight = router.layer.weight
            (weight.to_local() if isinstance(weight, torch.distributed.tensor.DTensor) else weight).zero_()


def plain_name(name: str) -> str:
    for wrapper in WRAPPERS:
        name = name.replace(wrapper, "")
    return name


def step(model: nn.Module, rank: int | None, world: int = w.WORLD) -> dict[str, Any]:
    """One step on rank `rank`'s rows of `world` ranks (None: one process, the mean of every rank's loss): loss
    terms, gradients, clipped norm, weights after AdamW."""
    batch = w.global_batches()[0]
    ranks = range(world) if rank is None else [rank]
    outs = [model(ids, labels=ids) for ids in (rank_rows(batch, r, world) for r in ranks)]
    (sum(out.loss for out in outs) / len(outs)).backward()
    terms = torch.stack([torch.stack([getattr(o, name).detach() for name in w.METRICS]) for o in outs]).mean(0)
    if rank is not None:
        torch.distributed.all_reduce(terms, op=torch.distributed.ReduceOp.AVG)
    grads = {plain_name(n): _full(p.grad) for n, p in model.named_parameters()}
    norm = clip_grad_norm_(model.parameters(), MAX_NORM)
    torch.optim.AdamW(model.parameters(), lr=w.LR, foreach=True).step()  # GPUs' default: for-each over two meshes
    weights = full_state_dict(model) if rank is not None else model.state_dict()
    return {"terms": dict(zip(w.METRICS, terms.tolist(), strict=True)), "grads": grads, "norm": float(norm),
            "weights": weights}


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, torch.distributed.tensor.DTensor) else t.clone()


def reference(name: str, world: int = w.WORLD) -> dict[str, Any]:
    torch.manual_seed(w.SEED)
    model = JetMoeForCausalLM(case_config(name))
    if {**CASES, **FOUR_RANKS}[name][2]:
        zero_block0_routers(model)
    return step(model, None, world)


def first_run(rank: int, out: Path) -> dict[str, Any]:
    """Every case on an EP = 2 mesh of the 2 ranks (the exchanges' split sizes recorded); an EP model exported as
    HF; Lightning's FSDP2Strategy with expert_parallel=2 for 2 steps, saved."""
    cases = _cases(rank, CASES)
    save_hf(_ep_model(w.SEED), out / "hf_ep")
    return {"cases": cases, "lightning": w.lightning_fit(rank, out, max_steps=2, resume=False, expert_parallel=EP)}


def resumed_without_ep(rank: int, out: Path) -> dict[str, Any]:
    """Fresh processes: the HF export loaded into an EP model (initialised differently); the Lightning run
    resumed to step 4 with expert_parallel=1 (DCP reshards the experts)."""
    model = _ep_model(w.SEED + 1)
    load_hf_weights(model, out / "hf_ep")
    return {"from_hf": full_state_dict(model),
            "lightning": w.lightning_fit(rank, out, max_steps=w.STEPS, resume=True, expert_parallel=1)}


def _ep_model(seed: int) -> JetMoeForCausalLM:
    torch.manual_seed(seed)
    return build_sharded_causal_lm(w.CONFIG, expert_parallel_mesh("cpu", EP), "cpu", expert_parallel_attention=True)


def four_ranks(rank: int, out: Path) -> dict[str, Any]:
    """The 4-rank case (spawned with world=4), its model saved as a DCP checkpoint after the step."""
    return _cases(rank, FOUR_RANKS, save_to=out / "dcp")


def _cases(rank: int, cases: dict[str, tuple], save_to: Path | None = None) -> dict[str, Any]:
    exchanges: list[tuple[list[int], list[int], list[int]]] = []
    make = ep.TokenExchange.__init__

    def recorded(self, counts_E, group):
        make(self, counts_E, group)
        exchanges.append((self.send_splits, self.receive_splits, self.groups.counts_E.tolist()))

    ep.TokenExchange.__init__ = recorded
    results = {}
    world = torch.distributed.get_world_size()
    for name, (_, options, zero_routers) in cases.items():
        torch.manual_seed(w.SEED)
        mesh = expert_parallel_mesh("cpu", EP)
        model = build_sharded_causal_lm(case_config(name), mesh, "cpu", **options)
        if zero_routers:
            zero_block0_routers(model)
        placements = {plain_name(n): (str(p.placements), tuple(p.device_mesh.mesh_dim_names), tuple(p.to_local().shape))
                      for n, p in model.named_parameters()}
        exchanges.clear()
        results[name] = {**step(model, rank, world), "placements": placements, "exchanges": list(exchanges)}
        if save_to is not None:
            dcp.save(get_model_state_dict(model), checkpoint_id=save_to)
    ep.TokenExchange.__init__ = make
    return results


def compiled(rank: int, out: Path) -> dict[str, Any]:
    """The 8-expert model with sharded MoA and full checkpointing, eager and with compiled blocks (aot_eager: no
    C++ build): loss and an expert gradient."""
    compile_ = torch.compile
    results = {}
    for name, backend in (("eager", None), ("compiled", "aot_eager")):
        torch.compile = compile_ if backend is None else (lambda module, **kw: compile_(module, backend=backend, **kw))
        torch.manual_seed(w.SEED)
        model = build_sharded_causal_lm(case_config(list(CASES)[1]), expert_parallel_mesh("cpu", EP), "cpu",
                                        compile=backend is not None, activation_checkpointing="full",
                                        expert_parallel_attention=True)
        ids = w.local_rows(w.global_batches()[0], rank)
        loss = model(ids, labels=ids).loss
        loss.backward()
        results[name] = (loss.detach(), _full(model.model.layers[0].mlp.input_linear.weight.grad))
    torch.compile = compile_
    return results
