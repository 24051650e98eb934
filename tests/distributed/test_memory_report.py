"""Parameter + AdamW memory per rank, FSDP (2 CPU processes) vs an unsharded replica (what each DDP rank
holds), at a mid-size config, counted from the tensors' local shards. Slow (about a minute): run with
`pytest -m slow tests/distributed/test_memory_report.py -s` to print the table of docs/distributed.md."""

from __future__ import annotations

import fsdp_workers as w
import pytest

from jetmoe import JetMoeForCausalLM
from jetmoe.distributed.plan import estimate

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_fsdp_halves_parameter_and_optimizer_memory_per_rank(tmp_path):
    sharded = w.spawn(w.mid_size_memory, tmp_path)
    replica = w.one_step_state_bytes(JetMoeForCausalLM(w.MID_CONFIG))
    plan = estimate(w.MID_CONFIG, seq_len=16, global_batch_tokens=32, micro_batch_size=1, gpus=w.WORLD,
                    gpu_memory_gb=80, precision="32-true")
    rows = [("unsharded / DDP rank", replica)] + [(f"FSDP rank {r}", b) for r, b in enumerate(sharded)]
    print(f"\n{w.MID_CONFIG.num_parameters()['total']:,} parameters")
    for name, b in rows:
        print(f"{name:<22} params {b['params'] / 2**20:8.1f} MiB   grads {b['grads'] / 2**20:8.1f} MiB   "
              f"AdamW {b['optimizer'] / 2**20:8.1f} MiB")
    print(f"plan (per FSDP rank)   params {plan['params_gb'] * 1e9 / 2**20:8.1f} MiB   "
          f"grads {plan['grads_gb'] * 1e9 / 2**20:8.1f} MiB   AdamW {plan['optimizer_gb'] * 1e9 / 2**20:8.1f} MiB")
    assert sum(b["params"] for b in sharded) == replica["params"]
    for b in sharded:
        for key in ("params", "grads", "optimizer"):
            assert b[key] == pytest.approx(replica[key] / 2, rel=0.01), key
            assert b[key] == pytest.approx(plan[f"{key}_gb"] * 1e9, rel=0.01), key
