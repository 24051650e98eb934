"""Complete an HF model directory (``config.json`` + weights) into one that every Hugging Face tool accepts.

    complete_hf_dir(directory, config, tokenizer="path/to/tokenizer.json", card=ModelCard(...))

writes, next to the weights:

* ``tokenizer.json`` (copied) with ``tokenizer_config.json`` and ``special_tokens_map.json`` naming the BOS, EOS
  and pad tokens (the strings the tokenizer has at the config's ids), so ``AutoTokenizer`` knows them and
  lm-evaluation-harness finds its prefix token; no BOS is added to encoded text (training data has none:
  documents are separated by EOS) and decoding keeps spaces as they are (code);
* ``generation_config.json``: the special ids (``pipeline("text-generation")`` stops at EOS), the context length
  as ``max_length`` and ``jetmoe generate``'s sampling defaults;
* ``README.md``: a model card in the HF convention (YAML metadata with ``model-index`` results, then the model,
  data, training and evaluation), its figures copied into ``figures/``.

It needs only the config and the tokenizer, so every export path calls it: ``jetmoe train``'s export,
``jetmoe consolidate`` (``jetmoe.training.report.complete_export`` adds the run's card) and
``jetmoe.save_pretrained(model, directory, tokenizer=...)``. Files are written to a temporary name and renamed into
place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml
from tokenizers import Tokenizer

from jetmoe.config import JetMoeConfig
from jetmoe.errors import InputFileError, MissingFileError
from jetmoe.files import atomic_copy, atomic_write_json, atomic_write_text

TOKENIZER_FILE, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP = "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"
GENERATION_CONFIG, MODEL_CARD, FIGURES_DIR = "generation_config.json", "README.md", "figures"
#: `jetmoe generate`'s defaults, so a pipeline samples like the command does.
SAMPLING_DEFAULTS = {"do_sample": True, "temperature": 0.8, "top_k": 50}


@dataclass
class CardMetric:
    """One evaluation result for ``model-index`` and the card's table."""

    dataset: str  # an id: a task name, a hub dataset id
    metric: str  # acc, acc_norm, loss, perplexity, ...
    value: float
    dataset_name: str = ""  # in words (default: the id)
    metric_name: str = ""  # in words (default: the metric)
    source: str = ""  # what computed it, e.g. "lm-evaluation-harness 0.4.13"
    partial: bool = False  # scored on part of the items (`jetmoe eval --limit`): in the card's table, not model-index


@dataclass
class ModelCard:
    """What a model card says beyond the architecture. Every field is optional."""

    name: str = ""
    summary: str = ""  # a paragraph under the title
    training_data: str = ""  # markdown
    training: Mapping[str, Any] = field(default_factory=dict)  # key facts of the run: steps, tokens, time, losses
    training_config: str = ""  # the resolved experiment YAML
    metrics: Sequence[CardMetric] = ()
    figures: Mapping[str, Path] = field(default_factory=dict)  # caption -> PNG (copied into figures/)
    datasets: Sequence[str] = ()  # hub dataset ids for the metadata
    license: str = "apache-2.0"


def complete_hf_dir(
    directory: str | Path, config: JetMoeConfig, tokenizer: str | Path | None = None, card: ModelCard | None = None
) -> list[Path]:
    """Write the tokenizer files, ``generation_config.json`` and ``README.md`` into ``directory`` (which holds the
    model's ``config.json`` and weights, or will); ``tokenizer`` is a ``tokenizer.json`` (None: the one already in
    ``directory``). Returns the files written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / TOKENIZER_FILE
    source = Path(tokenizer) if tokenizer is not None else target
    if not source.is_file():
        raise MissingFileError(f"{source}: tokenizer file not found (an HF directory needs its tokenizer.json)")
    written = []
    if source.resolve() != target.resolve():
        atomic_copy(source, target)
        written.append(target)
    special = special_tokens(Tokenizer.from_file(str(target)), config, target)
    written += [
        atomic_write_json(directory / TOKENIZER_CONFIG, tokenizer_config(special, config), indent=2),
        atomic_write_json(directory / SPECIAL_TOKENS_MAP, special, indent=2),
        write_generation_config(directory, config),
    ]
    card = card or ModelCard()
    figures = _copy_figures(card.figures, directory / FIGURES_DIR)
    text = render_model_card(card, config, str(directory), figures)
    atomic_write_text(directory / MODEL_CARD, text)
    return [*written, *figures.values(), directory / MODEL_CARD]


# ----------------------------------------------------------------------------- tokenizer and generation


def special_tokens(tokenizer: Tokenizer, config: JetMoeConfig, where: Path) -> dict[str, str]:
    """``{"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}``: the strings at the config's ids."""
    ids = {"bos_token": config.bos_token_id, "eos_token": (config.eos_token_ids or [None])[0],
           "pad_token": config.pad_token_id}
    special = {}
    for key, token_id in ids.items():
        if token_id is None:
            continue
        token = tokenizer.id_to_token(token_id)
        if token is None:
            raise InputFileError(f"{where}: has no token at {key.replace('_token', '')}_token_id {token_id}")
        special[key] = token
    return special


def tokenizer_config(special: Mapping[str, str], config: JetMoeConfig) -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": False,  # training documents start after an EOS, never with a BOS
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # byte-level BPE: decode(encode(text)) == text, also for code
        "model_max_length": config.max_position_embeddings,
        "model_input_names": ["input_ids", "attention_mask"],
    }


def generation_config(config: JetMoeConfig) -> dict[str, Any]:
    ids = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id}
    return {
        **{key: value for key, value in ids.items() if value is not None},
        "max_length": config.max_position_embeddings,
        **SAMPLING_DEFAULTS,
    }


def write_generation_config(directory: str | Path, config: JetMoeConfig) -> Path:
    """``generation_config.json``: it needs only the config, so every HF directory gets it, also one saved without a
    tokenizer (``jetmoe.save_pretrained``)."""
    return atomic_write_json(Path(directory) / GENERATION_CONFIG, generation_config(config), indent=2)


def _copy_figures(figures: Mapping[str, Path], out_dir: Path) -> dict[str, Path]:
    copied = {}
    for caption, path in figures.items():
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / Path(path).name
        if Path(path).resolve() != target.resolve():
            atomic_copy(path, target)
        copied[caption] = target
    return copied


# ----------------------------------------------------------------------------- model card


def render_model_card(card: ModelCard, config: JetMoeConfig, location: str, figures: Mapping[str, Path]) -> str:
    """The README.md text: YAML metadata (HF model-card fields), then markdown sections."""
    name = card.name or Path(location).resolve().name
    params = config.num_parameters()
    sections = [
        f"---\n{yaml.safe_dump(_metadata(card, name), sort_keys=False, allow_unicode=True)}---",
        f"# {name}",
        card.summary or (
            "A JetMoE language model: every layer has a Mixture of Attention heads (MoA) and a Mixture of MLP experts "
            "(MoE), each routing a token to the top-k of its experts. Trained with the `jetmoe` codebase; loads in "
            "Hugging Face `transformers` (`JetMoeForCausalLM`)."
        ),
        "## Model details\n\n" + _table(["", ""], [
            ["architecture", "`JetMoeForCausalLM` (`model_type: jetmoe`)"],
            ["parameters", f"{params['total']:,} total, {params['active']:,} active per token"],
            ["layers", str(config.num_hidden_layers)],
            ["hidden size", str(config.hidden_size)],
            ["attention", f"MoA: {config.num_local_experts} experts, top-{config.num_experts_per_tok}, "
                          f"{config.num_key_value_heads} KV heads x {config.kv_channels} channels"],
            ["MLP", f"MoE: {config.num_local_experts} experts, top-{config.num_experts_per_tok}, "
                    f"intermediate size {config.intermediate_size}, {config.activation_function}"],
            ["vocabulary", f"{config.vocab_size:,} (byte-level BPE)"],
            ["context length", f"{config.max_position_embeddings:,} tokens (RoPE, theta {config.rope_theta:g})"],
        ]),
        "## How to use\n\n" + _usage(location),
    ]
    if card.training_data:
        sections.append("## Training data\n\n" + card.training_data)
    if card.training or card.training_config:
        body = _table(["", ""], [[key, _fmt(value)] for key, value in card.training.items()]) if card.training else ""
        if card.training_config:
            body += ("\n\n" if body else "") + (
                "<details><summary>Resolved experiment config</summary>\n\n"
                f"```yaml\n{card.training_config.rstrip()}\n```\n\n</details>"
            )
        sections.append("## Training procedure\n\n" + body)
    if card.metrics:
        rows = [[m.dataset_name or m.dataset, m.metric_name or m.metric, _fmt(m.value), m.source] for m in card.metrics]
        sections.append("## Evaluation\n\n" + _table(["data", "metric", "value", "computed by"], rows))
    if figures:
        sections.append("## Figures\n\n" + "\n\n".join(
            f"**{caption}**\n\n![{caption}]({FIGURES_DIR}/{path.name})" for caption, path in figures.items()
        ))
    return "\n\n".join(sections) + "\n"


def _metadata(card: ModelCard, name: str) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "library_name": "transformers",
        "license": card.license,
        "pipeline_tag": "text-generation",
        "tags": ["jetmoe", "mixture-of-experts", "mixture-of-attention", "causal-lm"],
    }
    if card.datasets:
        meta["datasets"] = list(card.datasets)
    indexed = [m for m in card.metrics if not m.partial]
    if indexed:
        results = []
        latest = {(m.dataset, m.metric): m for m in indexed}  # one value per metric: the last one listed
        for dataset in dict.fromkeys(m.dataset for m in indexed):
            metrics = [m for (d, _), m in latest.items() if d == dataset]
            results.append({
                "task": {"type": "text-generation", "name": "Text Generation"},
                "dataset": {"name": metrics[0].dataset_name or dataset, "type": dataset},
                "metrics": [{"type": m.metric, "value": round(float(m.value), 6), "name": m.metric_name or m.metric}
                            for m in metrics],
            })
        meta["model-index"] = [{"name": name, "results": results}]
    return meta


def _usage(location: str) -> str:
    return (
        "```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline\n\n"
        f'path = "{location}"  # this directory\n'
        "tokenizer = AutoTokenizer.from_pretrained(path)\n"
        "model = AutoModelForCausalLM.from_pretrained(path)\n"
        "generate = pipeline(\"text-generation\", model=model, tokenizer=tokenizer)\n"
        "print(generate(\"def \", max_new_tokens=64)[0][\"generated_text\"])  # stops at EOS\n"
        "```\n\n"
        "Evaluate with lm-evaluation-harness:\n\n"
        f"```bash\nlm_eval --model hf --model_args pretrained={location} --tasks hellaswag --device cpu\n```"
    )


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)
