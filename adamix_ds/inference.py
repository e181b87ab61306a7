"""One call from a saved adapter folder to a model that predicts, in the spirit of PEFT's ``AutoPeftModel``.

``load_for_inference(folder)`` checks the folder (its manifest), reads the adapter config (the backbone it was
trained on: ``base_model_name_or_path``) and the task record (task, family, template, decoding; for an adapter
saved through the library alone, which has none, the config's ``task_type`` and ``label_names``), loads that
backbone with the family's head, injects AdaMix, loads the adapter strictly, merges the experts (or sets another
eval mode) and returns the model in eval mode with its tokenizer and its family's prediction step::

    adapter = load_for_inference("outputs/sst2_adamix/adapter")
    adapter.predict(["A gripping, beautifully acted film."])
    # [{"prediction": 1, "label": "positive", "probabilities": {"negative": 0.04, "positive": 0.96}}]

It is the one way to turn an adapter folder into a model: ``launchers/evaluate.py``, ``predict.py`` and ``export.py``
all call it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from adamix_ds.backbones import resolve_model_path
from adamix_ds.config import CONFIG_NAME, EVAL_MODES, AdaMixConfig
from adamix_ds.data import GenerationTaskSpec, TaskSpec, custom_task_spec, get_task_spec
from adamix_ds.distributed import DistEnv, dist_env
from adamix_ds.families import Decoding, TaskFamily, build_family, record_arguments
from adamix_ds.io import TASK_NAME, load_adapter, read_task_record
from adamix_ds.manifest import has_manifest, verify_manifest
from adamix_ds.model import merge_adamix, set_eval_mode

__all__ = ["DTYPES", "LoadedAdapter", "load_for_inference"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The sequence length of adapters whose task record does not give one (the launcher's default).
DEFAULT_MAX_SEQ_LENGTH = 128


@dataclass
class LoadedAdapter:
    """A backbone with a loaded adapter, in eval mode, ready to predict.

    Attributes:
        model: the Hugging Face model with the adapter (merged unless another eval mode was asked for).
        tokenizer: the backbone's tokenizer.
        family: the task family (its inputs, batches, logits and prediction step).
        path: the adapter folder.
        config: the adapter's config as saved.
    """

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    family: TaskFamily
    path: Path
    config: AdaMixConfig

    def inputs(self, rows: datasets.Dataset | Mapping[str, Sequence[str]] | Sequence[str | Sequence[str]]) -> datasets.Dataset:
        """``rows`` as a dataset of the family's text columns (``family.input_columns``): a dataset or a mapping of
        those columns, a list of texts (one text column) or a list of text tuples (a sentence pair)."""
        columns = self.family.input_columns
        if isinstance(rows, datasets.Dataset):
            return rows
        if isinstance(rows, Mapping):
            return datasets.Dataset.from_dict({name: list(rows[name]) for name in columns})
        tuples = [(row,) if isinstance(row, str) else tuple(row) for row in rows]
        if any(len(row) != len(columns) for row in tuples):
            raise ValueError(f"every input needs {len(columns)} text(s) ({', '.join(columns)}) for task {self.family.spec.name}")
        return datasets.Dataset.from_dict({name: [row[i] for row in tuples] for i, name in enumerate(columns)})

    def predict(
        self,
        rows: datasets.Dataset | Mapping[str, Sequence[str]] | Sequence[str | Sequence[str]],
        batch_size: int = 32,
        env: DistEnv | None = None,
        progress: bool = False,
    ) -> list[dict[str, Any]]:
        """The family's prediction of every row (see ``inputs``), in order: for classification ``prediction`` (class
        id), ``label`` and ``probabilities``; for regression the score; for generation the decoded text. Under
        several ranks (``env``, default this process's) every rank calls it and predicts a shard."""
        encoded = self.family.encode_inputs(self.inputs(rows))
        return self.family.predict(self.model, encoded, batch_size, env or dist_env(), progress)


def _adapter_folder(adapter: str | Path) -> Path:
    """A local adapter folder, or a Hub repo id downloaded into the Hub cache."""
    path = Path(adapter)
    if path.is_dir():
        return path
    if path.exists() or str(adapter).count("/") != 1:
        raise FileNotFoundError(f"adapter_name_or_path={adapter} is not an adapter folder (nor a Hub repo id)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(adapter)))
    except Exception as error:  # the Hub client's many error types, as one line
        raise FileNotFoundError(
            f"adapter_name_or_path={adapter} is no local folder and could not be downloaded from the Hub ({type(error).__name__})"
        ) from None


def _task_spec(path: Path, config: AdaMixConfig, record: Mapping[str, Any], task_name: str | None) -> TaskSpec | GenerationTaskSpec:
    """The task of the adapter at ``path``: ``task_name``, else the one its task record names, else the task its
    model stands for (``config.task_type`` and ``label_names``: an adapter saved through the library alone)."""
    recorded_task = record.get("task_name")
    if task_name is not None and recorded_task is not None and get_task_spec(task_name).name != recorded_task:
        raise ValueError(f"task_name={task_name} contradicts the adapter at {path}, trained on {recorded_task}: allowed {recorded_task}")
    if task_name or recorded_task:
        return get_task_spec(task_name or recorded_task)
    if config.task_type is not None:
        try:
            return custom_task_spec(config.task_type, config.label_names)
        except ValueError as error:
            raise ValueError(f"the adapter at {path}: {error} (in its {CONFIG_NAME}): pass --task_name (task_name= in Python)") from None
    raise ValueError(
        f"the adapter at {path} records no task: no task_name in a {TASK_NAME} and no task_type in its {CONFIG_NAME} (recorded "
        "by save_adapter for a sequence classifier or a causal LM): pass --task_name (task_name= in Python)"
    )


def load_for_inference(
    adapter_name_or_path: str | Path,
    base_model_name_or_path: str | None = None,
    *,
    task_name: str | None = None,
    max_seq_length: int | None = None,
    tokenizer_name: str | None = None,
    eval_mode: str | None = "merged",
    eval_expert: int = 0,
    decoding: Mapping[str, Any] | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> LoadedAdapter:
    """Load the adapter folder (or Hub repo) ``adapter_name_or_path`` for inference; see the module docstring.

    ``base_model_name_or_path`` replaces the recorded backbone (a local copy of it); ``task_name`` and
    ``max_seq_length`` replace or, where the folder records none, supply the task record's. An adapter without a
    named task (saved through the library alone: ``add_adamix``, ``save_adapter``) is loaded as its model records it
    (``AdaMixConfig.task_type``): a sequence classifier of its ``label_names`` reading one text (``text``), or a
    causal LM that continues a text. ``eval_mode``:
    ``"merged"`` merges the experts into one adapter, ``"ensemble"``/``"random"``/``"fixed"`` (with
    ``eval_expert``) keep them and route so, ``None`` keeps them with the saved eval mode. ``decoding``: fields of
    ``Decoding`` that replace the saved decoding of a generation adapter. ``device``/``dtype`` (a torch dtype or
    ``"float32"``, ``"bfloat16"``, ``"float16"``): where and in what precision the model runs.

    Raises ``ValueError``/``FileNotFoundError`` with one line naming a damaged or missing file, an adapter that
    does not fit the backbone (the strict loader names the key), or what the folder does not record.
    """
    if eval_mode is not None and eval_mode not in EVAL_MODES:
        raise ValueError(f"eval_mode={eval_mode!r} is invalid: allowed {', '.join(EVAL_MODES)}")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is invalid: allowed {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    path = _adapter_folder(adapter_name_or_path)
    if has_manifest(path):  # before the backbone loads: a damaged folder fails in a second
        verify_manifest(path)
    config = AdaMixConfig.load(path)
    record = read_task_record(path) or {}
    base = base_model_name_or_path or config.base_model_name_or_path
    if base is None:
        raise ValueError(
            f"the adapter at {path} does not record the backbone it was trained on (no base_model_name_or_path in its "
            f"{CONFIG_NAME}; save_adapter records the model's name_or_path, which a model built from a config lacks): "
            "pass --base_model_name_or_path (base_model_name_or_path= in Python)"
        )
    spec = _task_spec(path, config, record, task_name)
    model_path = resolve_model_path(base)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name or model_path)
    options = record_arguments(record or None)
    if isinstance(spec, GenerationTaskSpec):  # the saved decoding, then the caller's changes to it
        options["decoding"] = Decoding(**{**record.get("decoding", {}), **(decoding or {})})
    length = max_seq_length or record.get("max_seq_length") or DEFAULT_MAX_SEQ_LENGTH
    family = build_family(spec, tokenizer, length, model_path, **options)
    model = family.load_model(model_path)
    load_adapter(model, path)
    if eval_mode == "merged":
        merge_adamix(model)
    elif eval_mode is not None:
        set_eval_mode(model, eval_mode, eval_expert)
    model.to(device=device, dtype=dtype)
    return LoadedAdapter(model.eval(), tokenizer, family, path, config)
