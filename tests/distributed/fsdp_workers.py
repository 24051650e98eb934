"""Worker processes of the 2-process FSDP tests (gloo on CPU), and their single-process reference.

`torch.multiprocessing.spawn` pickles functions by module name, so the workers live in this importable module
(conftest.py puts its directory on sys.path, which spawned children inherit). Each phase writes its results to
`<out>/<phase>_rank<r>.pt`; the tests assert on them.

Data parallelism: rank r trains on rows [r·B, (r+1)·B) of every global batch. Its loss (CE + aux + z, with the
load-balancing loss computed over its own rows) is averaged over ranks by FSDP's gradient reduction, so the
single-process reference computes each half's loss separately and averages them (not one loss over 2·B rows).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from jetmoe import JetMoeConfig, JetMoeForCausalLM
from jetmoe.distributed import build_sharded_causal_lm, full_state_dict, load_hf_weights, save_hf
from jetmoe.distributed.plan import local_state_bytes
from jetmoe.distributed.strategy import FSDP2Strategy

CONFIG = JetMoeConfig.from_name("test", pad_token_id=0, router_z_loss_coef=1e-3)
WORLD, STEPS, LOCAL_BATCH, SEQ, SEED, LR, CLIP = 2, 4, 2, 16, 0, 1e-2, 1.0
PARALLEL = dict(activation_checkpointing="selective")  # blocks 0, 2, ... checkpointed: both kinds are exercised
METRICS = ("loss", "ce_loss", "aux_loss", "z_loss")


def global_batches() -> torch.Tensor:
    """`[STEPS, WORLD·LOCAL_BATCH, SEQ]` token ids, the same in every process."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, CONFIG.vocab_size, (STEPS, WORLD * LOCAL_BATCH, SEQ), generator=g)


def local_rows(batch: torch.Tensor, rank: int) -> torch.Tensor:
    return batch[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH]


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR)


# ----------------------------------------------------------------------------- launching


def spawn(phase: Callable[..., dict[str, Any]], out: Path, world: int = WORLD) -> list[dict[str, Any]]:
    """Run `phase(rank, out)` in `world` fresh processes joined by gloo; returns each rank's result."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_entry, args=(phase, port, out, world), nprocs=world, join=True)
    return [torch.load(out / f"{phase.__name__}_rank{r}.pt", weights_only=True) for r in range(world)]


def _entry(rank: int, phase: Callable[..., dict[str, Any]], port: int, out: Path, world: int) -> None:
    # LOCAL_RANK etc. let Lightning see externally created processes (it reuses this process group).
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0",
                      WORLD_SIZE=str(world), RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(phase(rank, out), out / f"{phase.__name__}_rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    # The results are on disk: skip the interpreter's finalization, where gloo's worker threads sometimes abort
    # the process (SIGABRT after everything above returned, about 1 spawn in 7 here; pytorch/pytorch#179291).
    os._exit(0)


# ----------------------------------------------------------------------------- training loops


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range, rank: int) -> list[dict[str, float]]:
    """Optimizer steps on this rank's rows; returns the rank-averaged loss terms of each step."""
    batches, history = global_batches(), []
    for step in steps:
        ids = local_rows(batches[step], rank)
        out = model(ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
        terms = torch.stack([getattr(out, name).detach() for name in METRICS])
        dist.all_reduce(terms, op=dist.ReduceOp.AVG)
        history.append(dict(zip(METRICS, terms.tolist(), strict=True)))
    return history


def reference(steps: int = STEPS) -> tuple[list[dict[str, float]], JetMoeForCausalLM]:
    """One process, the full model: each step averages the WORLD local losses (as data parallelism does)."""
    torch.manual_seed(SEED)
    model = JetMoeForCausalLM(CONFIG)
    opt, history = optimizer(model), []
    for batch in global_batches()[:steps]:
        outs = [model(ids, labels=ids) for ids in (local_rows(batch, r) for r in range(WORLD))]
        loss = sum(out.loss for out in outs) / WORLD
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
        history.append({name: sum(getattr(o, name).item() for o in outs) / WORLD for name in METRICS})
    return history, model


def _sharded_model() -> JetMoeForCausalLM:
    torch.manual_seed(SEED)
    mesh = init_device_mesh("cpu", (WORLD,))
    return build_sharded_causal_lm(CONFIG, mesh, "cpu", **PARALLEL)


# ----------------------------------------------------------------------------- phases


def first_run(rank: int, out: Path) -> dict[str, Any]:
    """Meta init; 4 uninterrupted steps; a second run of 2 steps exported as HF; Lightning (FSDP2Strategy) for 2
    steps, saved."""
    model = _sharded_model()
    init = full_state_dict(model)
    placements = {name: (type(p).__name__, str(p.placements), p.device_mesh.size())
                  for name, p in model.named_parameters()}
    opt = optimizer(model)
    uninterrupted = train(model, opt, range(STEPS), rank)
    state_bytes = local_state_bytes(model, opt)

    model = _sharded_model()
    opt = optimizer(model)
    train(model, opt, range(2), rank)
    save_hf(model, out / "hf_step2")
    lightning = lightning_fit(rank, out, max_steps=2, resume=False)
    return {"init": init, "placements": placements, "uninterrupted": uninterrupted, "state_bytes": state_bytes,
            "lightning": lightning}


def resumed_run(rank: int, out: Path) -> dict[str, Any]:
    """Fresh processes: load the HF export into a sharded model; resume the Lightning run to step 4."""
    torch.manual_seed(SEED + 1)  # a different init: everything must come from the checkpoints
    mesh = init_device_mesh("cpu", (WORLD,))
    hf_model = build_sharded_causal_lm(CONFIG, mesh, "cpu")
    load_hf_weights(hf_model, out / "hf_step2")
    lightning = lightning_fit(rank, out, max_steps=STEPS, resume=True)
    return {"from_hf": full_state_dict(hf_model), "lightning": lightning}


# ----------------------------------------------------------------------------- Lightning


class TinyLitModule(L.LightningModule):
    """What `JetMoeLitModule.configure_model` does under FSDP2Strategy, on the test's data and optimizer."""

    def __init__(self) -> None:
        super().__init__()
        self.model: JetMoeForCausalLM | None = None
        self.history: list[dict[str, float]] = []
        self.batches = global_batches()

    def configure_model(self) -> None:
        if self.model is None:
            torch.manual_seed(SEED)
            device = self.trainer.strategy.root_device
            self.model = build_sharded_causal_lm(CONFIG, self.device_mesh, device, **PARALLEL)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids = local_rows(self.batches[self.trainer.global_step], self.trainer.global_rank)
        out = self.model(ids, labels=ids)
        terms = torch.stack([getattr(out, name).detach() for name in METRICS])
        dist.all_reduce(terms, op=dist.ReduceOp.AVG)
        self.history.append(dict(zip(METRICS, terms.tolist(), strict=True)))
        return out.loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return optimizer(self.model)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(range(STEPS), batch_size=None)  # steps index self.batches


def lightning_fit(rank: int, out: Path, max_steps: int, resume: bool, expert_parallel: int = 1) -> dict[str, Any]:
    ckpt = out / "lightning" / "last.ckpt"
    trainer = L.Trainer(
        accelerator="cpu", devices=WORLD, strategy=FSDP2Strategy(expert_parallel), precision="32-true",
        max_steps=max_steps,
        gradient_clip_val=CLIP, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
        default_root_dir=out / "lightning",
    )
    module = TinyLitModule()
    trainer.fit(module, ckpt_path=ckpt if resume else None)
    trainer.save_checkpoint(ckpt)
    embed = module.model.model.embed_tokens.weight
    return {"history": module.history, "mesh_shape": tuple(module.device_mesh.shape),
            "embed_placements": str(embed.placements), "full": full_state_dict(module.model)}


# ----------------------------------------------------------------------------- memory report (slow)

MID_CONFIG = JetMoeConfig(
    vocab_size=32000, hidden_size=512, num_hidden_layers=8, num_key_value_heads=8, kv_channels=64,
    intermediate_size=1408, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=256,
)


def one_step_state_bytes(model: nn.Module) -> dict[str, int]:
    """Local parameter and AdamW-state bytes after one optimizer step (when the states exist)."""
    opt = optimizer(model)
    ids = torch.randint(0, MID_CONFIG.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
    model(ids, labels=ids).loss.backward()
    opt.step()
    return local_state_bytes(model, opt)


def mid_size_memory(rank: int, out: Path) -> dict[str, Any]:
    mesh = init_device_mesh("cpu", (WORLD,))
    return one_step_state_bytes(build_sharded_causal_lm(MID_CONFIG, mesh, "cpu"))
