"""The model card of an adapter folder (``README.md`` in the Hugging Face format) and its upload to the Hub.

``save_adapter`` writes the card into every adapter folder: YAML front matter (``library_name``, ``base_model``,
``tags``, ``datasets``, ``metrics``; the licence is the owner's to add), then the method and its configuration, the
training data and hyper-parameters, the final metrics and a loading snippet. The card is for people: it is left
out of the folder's manifest, so that adding a licence or a paragraph does not make the adapter fail its check.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from adamix_ds.config import AdaMixConfig

__all__ = ["CARD_NAME", "LIBRARY_NAME", "adapter_card", "push_folder"]

CARD_NAME = "README.md"
LIBRARY_NAME = "adamix-ds"
# An example input per family and number of text columns, for the card's loading snippet.
_EXAMPLES = {
    ("generation", 1): '["name[The Eagle], eatType[coffee shop], food[French], area[riverside]"]',
    ("classification", 1): '["A gripping, beautifully acted film."]',
    ("classification", 2): '[("A man is playing a guitar.", "Someone plays an instrument.")]',
}


def _metric_names(metrics: Mapping[str, Any]) -> list[str]:
    names = (key.split("_", 1)[1] for key in metrics if key.startswith(("eval_", "test_")) and not key.endswith("loss"))
    return list(dict.fromkeys(name.removesuffix("_mm") for name in names))


def _table(rows: Mapping[str, Any]) -> str:
    lines = ["| | |", "|:---|:---|"]
    for key, value in rows.items():
        text = f"{value:.4f}" if isinstance(value, float) else json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        lines.append(f"| {key} | {text} |")
    return "\n".join(lines)


def adapter_card(
    config: AdaMixConfig,
    task: Mapping[str, Any] | None,
    location: str,
    metrics: Mapping[str, Any] | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
) -> ModelCard:
    """The model card of an adapter with ``config`` and task record ``task`` (``None``: an adapter saved without one),
    loadable from ``location`` (the folder, or a Hub repo id), with the run's final ``metrics`` and training
    ``hyperparameters`` when known."""
    task = dict(task or {})
    # Without a task record the model's task type decides the family, as load_for_inference reads it.
    family = task.get("family") or ("generation" if config.task_type == "CAUSAL_LM" else "classification")
    task_name = task.get("task_name")
    method = "AdaMix-LoRA" if config.adapter_type == "lora" else "AdaMix (bottleneck adapters)"
    tags = ["adamix", "peft", "mixture-of-adapters", config.adapter_type, family, *([task_name] if task_name else [])]
    data = ModelCardData(
        library_name=LIBRARY_NAME,
        base_model=config.base_model_name_or_path,
        tags=tags,
        datasets=[task["dataset"]] if task.get("dataset") else None,
        metrics=_metric_names(metrics or {}) or None,
    )
    columns = 2 if family != "generation" and len(task.get("text_columns", ())) == 2 else 1
    example = _EXAMPLES.get(("generation" if family == "generation" else "classification", columns))
    experts = f"{config.num_experts} experts per projection" if config.num_experts > 1 else "merged: the experts averaged into one adapter"
    sections = [
        f"# {method} adapter{f' for {task_name}' if task_name else ''}",
        "",
        f"A mixture-of-adaptations ([AdaMix](https://arxiv.org/abs/2205.12410)) adapter for `{config.base_model_name_or_path}`, "
        f"trained with adamix-ds: {config.adapter_type} adapters of rank {config.bottleneck_dim}, {experts}; "
        f"task family `{family}`. Licence: to be added by the owner.",
        "",
        "## Use",
        "",
        "```python",
        "from adamix_ds.inference import load_for_inference",
        "",
        "# a local folder or a Hub repo id; base_model_name_or_path=... loads a local copy of the backbone",
        f'adapter = load_for_inference("{location}")',
        f"print(adapter.predict({example}))",
        "```",
        "",
        "Or from the command line: `python launchers/predict.py --adapter_name_or_path <this folder> --input FILE --text_column COLUMN`.",
        "",
        "## Configuration",
        "",
        _table({k: v for k, v in config.to_dict().items() if v is not None}),
    ]
    if task:
        sections += ["", "## Task", "", _table(task)]
    if hyperparameters:
        sections += ["", "## Training data and hyper-parameters", "", _table(hyperparameters)]
    if metrics:
        sections += ["", "## Final metrics", "", _table(metrics)]
    sections.append("")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(sections))


def push_folder(folder: str | Path, repo_id: str, private: bool | None = None) -> str:
    """Upload ``folder`` to the Hub model repository ``repo_id`` (created if needed) with ``upload_folder``; return
    the commit's URL. Any failure (offline, no token, no permission) is a ``RuntimeError`` with one line saying
    why; the local folder is never touched."""
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo_id, repo_type="model", exist_ok=True, private=private)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=f"Upload {Path(folder).name} (adamix-ds)")
    except Exception as error:  # the Hub client's many error types (HTTP, offline mode, auth) as one line
        reason = " ".join(str(error).split()) or type(error).__name__
        raise RuntimeError(
            f"upload of {folder} to the Hub repo {repo_id} failed ({type(error).__name__}: {reason}); the local folder is kept"
        ) from None
    return str(commit.commit_url)
