"""Log-likelihood scoring: the batched, padded, truncated path equals one sequence at a time, acc / acc_norm follow
lm-eval's rules, and lm-evaluation-harness itself gives the same numbers on the same items."""

from __future__ import annotations

import pytest
import torch

from jetmoe.eval.scoring import accuracy, build_requests, encode_pair, loglikelihoods, score_task
from jetmoe.eval.tasks import MultipleChoiceItem, MultipleChoiceTask


def test_encode_pair_moves_trailing_whitespace_to_the_continuation():
    seen = []

    def encode(text):
        seen.append(text)
        return [ord(c) for c in text]

    context_ids, continuation_ids = encode_pair(encode, "a = 1\n  ", "b")
    assert seen == ["a = 1\n  b", "a = 1"]
    assert context_ids == [ord(c) for c in "a = 1"] and continuation_ids == [ord(c) for c in "\n  b"]


def test_empty_context_is_conditioned_on_the_prefix_token():
    task = MultipleChoiceTask("t", (MultipleChoiceItem("", ("xy", "z"), 0),), target_delimiter="")
    requests = build_requests(task, lambda text: [ord(c) for c in text], prefix_token_id=2)
    assert [(r.context_ids, r.continuation_ids) for r in requests] == [((2,), (120, 121)), ((2,), (122,))]


def test_batched_loglikelihoods_equal_one_sequence_at_a_time(model, encode, task):
    requests = build_requests(task, encode, prefix_token_id=2)
    max_length = 64  # shorter than most requests: those lose tokens on the left, as in lm-eval
    assert any(len(r.context_ids) + len(r.continuation_ids) > max_length + 1 for r in requests)
    batched = loglikelihoods(model, requests, batch_size=7, max_length=max_length, pad_token_id=0)
    with torch.no_grad():
        for r, ll in zip(requests, batched):
            ids = list(r.context_ids + r.continuation_ids)[-(max_length + 1):]
            logp = model(torch.tensor([ids[:-1]])).logits.log_softmax(-1)[0]
            n = len(r.continuation_ids)
            expected = logp[-n:].gather(-1, torch.tensor(ids[-n:])[:, None]).sum()
            assert ll.item() == pytest.approx(expected.item(), abs=1e-4)


def test_acc_and_acc_norm_follow_lm_eval():
    items = (MultipleChoiceItem("q", ("a", "bbbb"), 1), MultipleChoiceItem("q", ("aa", "b"), 0),
             MultipleChoiceItem("q", ("x", "y"), 1))
    task = MultipleChoiceTask("t", items)
    requests = build_requests(task, lambda text: [ord(c) for c in text], prefix_token_id=2)
    # item 0: raw picks "a", per character picks "bbbb"; item 1: both pick "aa"; item 2: a tie goes to the first
    lls = torch.tensor([-2.0, -4.0, -3.0, -4.0, -1.0, -1.0], dtype=torch.float64)
    assert accuracy(task, requests, lls) == {"acc": pytest.approx(1 / 3), "acc_norm": pytest.approx(2 / 3)}


def test_score_task_restores_the_training_mode(model, encode, task):
    model.train()
    result = score_task(model, task, encode, eos_token_id=2, batch_size=16)
    assert model.training and 0 <= result["acc"] <= 1 and 0 <= result["acc_norm"] <= 1
    model.eval()


def test_lm_eval_gives_the_same_numbers_on_the_same_items(model, encode, task, hf_dir, tmp_path, monkeypatch):
    """lm-eval's `hf` model (transformers' JetMoe on the exported directory) against our scorer on our model."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from jetmoe.eval.harness import lm_eval_task_config

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = lm_eval_task_config(task, task.write_jsonl(tmp_path / "mini.jsonl"))
    out = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(hf_dir), "prefix_token_id": 2}, tasks=[config],
        task_manager=TaskManager(include_defaults=False), batch_size=8, device="cpu", log_samples=True,
    )
    theirs = out["results"]["mini"]
    requests = build_requests(task, encode, prefix_token_id=2)
    lls = loglikelihoods(model, requests, batch_size=8, max_length=model.config.max_position_embeddings)
    ours = accuracy(task, requests, lls)
    assert ours["acc"] == theirs["acc,none"] and ours["acc_norm"] == theirs["acc_norm,none"]
    by_item = {sample["doc_id"]: [resp[0][0] for resp in sample["resps"]] for sample in out["samples"]["mini"]}
    for r, ll in zip(requests, lls):
        assert ll.item() == pytest.approx(by_item[r.item][r.choice], abs=1e-3)
