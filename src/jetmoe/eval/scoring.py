"""Log-likelihood scoring of multiple-choice tasks, computed as lm-evaluation-harness (0.4) computes it.

For each item and choice the request is ``(context, target_delimiter + choice)``. As lm-eval's ``_encode_pair``
does for causal models, trailing whitespace of the context moves to the continuation, the whole string is
encoded once and the continuation is what follows the context's tokens; an empty context is conditioned on the
EOS token instead (the document boundary the model was trained after; ``jetmoe eval --tasks`` passes the same
``prefix_token_id`` to lm-eval). Sequences longer than the model's ``max_position_embeddings`` + 1 lose tokens on
the left. The score is the summed log-probability of the continuation tokens, and

* ``acc``       = the right choice has the highest log-likelihood,
* ``acc_norm``  = the right choice has the highest log-likelihood divided by its length in characters
  (``len(choice)``, delimiter excluded),

ties going to the first choice (``numpy.argmax``), exactly lm-eval's ``multiple_choice`` ``process_results``.
``tests/eval/test_scoring.py`` checks both against lm-eval on the same items.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from jetmoe.eval.tasks import MultipleChoiceTask

Encode = Callable[[str], list[int]]


@dataclass(frozen=True)
class Request:
    item: int
    choice: int
    context_ids: tuple[int, ...]
    continuation_ids: tuple[int, ...]


def encode_pair(encode: Encode, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's causal ``_encode_pair``: (context tokens, continuation tokens) of a non-empty context."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = encode(context + continuation)
    context_ids = encode(context)
    return context_ids, whole[len(context_ids) :]


def build_requests(task: MultipleChoiceTask, encode: Encode, prefix_token_id: int) -> list[Request]:
    """One request per (item, choice), in item order."""
    requests = []
    for i, item in enumerate(task.items):
        for j, choice in enumerate(item.choices):
            continuation = task.target_delimiter + choice
            if item.context:
                context_ids, continuation_ids = encode_pair(encode, item.context, continuation)
            else:  # lm-eval: condition on the prefix token unless the continuation starts with it
                continuation_ids = encode(continuation)
                if continuation_ids[0] == prefix_token_id:
                    context_ids, continuation_ids = continuation_ids[:1], continuation_ids[1:]
                else:
                    context_ids = [prefix_token_id]
            if not continuation_ids:
                raise ValueError(f"task {task.name!r} item {i} choice {j}: the continuation encodes to no tokens")
            requests.append(Request(i, j, tuple(context_ids), tuple(continuation_ids)))
    return requests


@torch.no_grad()
def loglikelihoods(
    model: torch.nn.Module,
    requests: Sequence[Request],
    *,
    batch_size: int,
    max_length: int,
    pad_token_id: int = 0,  # any valid id: no scored position sees the padding
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``[len(requests)]`` float64 summed log-probabilities of each continuation given its context.

    Requests are batched longest first and right-padded (a causal model's real positions never see the padding);
    logits are computed only from the earliest continuation position of each batch on (``logits_to_keep``).
    The caller puts the model in eval mode.
    """
    longest = max((len(r.continuation_ids) for r in requests), default=0)
    if longest > max_length:
        raise ValueError(f"a choice of {longest} tokens does not fit the model's {max_length} positions")
    order = sorted(range(len(requests)), key=lambda r: -len(requests[r].context_ids) - len(requests[r].continuation_ids))
    result = torch.empty(len(requests), dtype=torch.float64)
    for start in range(0, len(order), batch_size):
        batch = [requests[r] for r in order[start : start + batch_size]]
        rows = [(r.context_ids + r.continuation_ids)[-(max_length + 1) :][:-1] for r in batch]
        width = max(map(len, rows))
        input_ids_BT = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        for b, row in enumerate(rows):
            input_ids_BT[b, : len(row)] = torch.tensor(row)
        first = min(len(row) - len(r.continuation_ids) for row, r in zip(rows, batch))  # earliest scored position
        logits_BKV = model(input_ids_BT.to(device), logits_to_keep=width - first, use_cache=False).logits
        logp_BKV = logits_BKV.float().log_softmax(-1).cpu()
        for b, (row, r) in enumerate(zip(rows, batch)):
            cont = torch.tensor(r.continuation_ids)
            offset = len(row) - len(cont) - first  # the continuation's first logit in the kept window
            picked = logp_BKV[b, offset : offset + len(cont)].gather(-1, cont[:, None])
            result[order[start + b]] = picked.double().sum()
    return result


def accuracy(task: MultipleChoiceTask, requests: Sequence[Request], lls: torch.Tensor) -> dict[str, float]:
    """``acc`` and ``acc_norm`` (fractions of items) from the requests' log-likelihoods; ties: first choice."""
    correct = correct_counts(task, requests, lls)
    return {"acc": correct[0] / len(task.items), "acc_norm": correct[1] / len(task.items)}


def correct_counts(task: MultipleChoiceTask, requests: Sequence[Request], lls: torch.Tensor) -> tuple[int, int]:
    """(items right by ``acc``, items right by ``acc_norm``) among the items the requests cover."""
    per_item: dict[int, list[float]] = {}
    for request, ll in zip(requests, lls.tolist()):
        per_item.setdefault(request.item, [0.0] * len(task.items[request.item].choices))[request.choice] = ll
    acc = acc_norm = 0
    for i, scores in per_item.items():
        item = task.items[i]
        acc += _argmax(scores) == item.label
        acc_norm += _argmax([s / len(c) for s, c in zip(scores, item.choices)]) == item.label
    return acc, acc_norm


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # the first of equal maxima, as numpy.argmax


def score_task(
    model: torch.nn.Module,
    task: MultipleChoiceTask,
    encode: Encode,
    *,
    eos_token_id: int,
    batch_size: int = 32,
) -> dict[str, float]:
    """``acc`` / ``acc_norm`` of ``model`` (a JetMoeForCausalLM) on ``task``, in one process (eval mode, no grad)."""
    requests = build_requests(task, encode, eos_token_id)
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        lls = loglikelihoods(model, requests, batch_size=batch_size, max_length=model.config.max_position_embeddings,
                             pad_token_id=eos_token_id, device=device)
    finally:
        model.train(was_training)
    return accuracy(task, requests, lls)
