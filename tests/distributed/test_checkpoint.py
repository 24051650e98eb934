"""Atomic sharded checkpoints (one process, no process group: DCP writes a single shard)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from jetmoe import JetMoeForCausalLM
from jetmoe.distributed import checkpoint as ckpt
from jetmoe.distributed import load_sharded, resolve_checkpoint, save_sharded
from jetmoe.distributed.strategy import FSDP2Strategy

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


class Died(RuntimeError):
    """Stands in for a process killed in the middle of a save."""


@pytest.fixture
def trained(tiny_config):
    model = JetMoeForCausalLM(tiny_config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _step(model, opt)
    return model, opt


def _step(model, opt) -> None:
    ids = torch.randint(0, 128, (2, 8))
    model(ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_loads(directory: Path, tiny_config, weights, step: int) -> None:
    model = JetMoeForCausalLM(tiny_config)
    extra = load_sharded(directory, model, torch.optim.AdamW(model.parameters()))
    assert extra == {"step": step}
    for name, tensor in weights.items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_a_save_that_dies_leaves_the_previous_checkpoint(trained, tiny_config, tmp_path, monkeypatch):
    model, opt = trained
    target = tmp_path / "last"
    save_sharded(target, model, opt, extra={"step": 1})
    first = _weights(model)
    _step(model, opt)

    def write_then_die(state, checkpoint_id):
        real_save(state, checkpoint_id=checkpoint_id)
        raise Died

    real_save = ckpt.dcp.save
    monkeypatch.setattr(ckpt.dcp, "save", write_then_die)
    with pytest.raises(Died):
        save_sharded(target, model, opt, extra={"step": 2})
    assert (tmp_path / ".last.tmp").is_dir()  # the half-finished save, beside the intact checkpoint
    _assert_loads(target, tiny_config, first, step=1)

    monkeypatch.setattr(ckpt.dcp, "save", real_save)
    save_sharded(target, model, opt, extra={"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    _assert_loads(target, tiny_config, _weights(model), step=2)


def test_a_crash_between_the_renames_falls_back_to_the_old_checkpoint(trained, tiny_config, tmp_path):
    model, opt = trained
    target = tmp_path / "last"
    save_sharded(target, model, opt, extra={"step": 1})
    target.rename(tmp_path / ".last.old")  # replace_dir's first rename done, the second not
    assert resolve_checkpoint(target) == tmp_path / ".last.old"
    _assert_loads(target, tiny_config, _weights(model), step=1)
    save_sharded(target, model, opt, extra={"step": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    with pytest.raises(FileNotFoundError):
        resolve_checkpoint(tmp_path / "missing")


def test_lightning_strategy_save_is_atomic(tmp_path, monkeypatch):
    """FSDP2Strategy writes Lightning's sharded checkpoint beside the target and renames it into place."""
    target = tmp_path / "last.ckpt"

    def fake_save(self, checkpoint, filepath, storage_options=None):
        Path(filepath).mkdir()
        (Path(filepath) / "meta.pt").write_text(str(checkpoint["step"]))
        if checkpoint["step"] == 3:
            raise Died

    monkeypatch.setattr(ModelParallelStrategy, "save_checkpoint", fake_save)
    strategy = FSDP2Strategy()
    strategy.save_checkpoint({"step": 1}, target)
    strategy.save_checkpoint({"step": 2}, target)
    assert (target / "meta.pt").read_text() == "2"
    with pytest.raises(Died):
        strategy.save_checkpoint({"step": 3}, target)
    assert (target / "meta.pt").read_text() == "2"
    strategy.save_checkpoint({"step": 4}, target)
    assert (target / "meta.pt").read_text() == "4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
