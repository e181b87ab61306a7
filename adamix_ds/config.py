"""``AdaMixConfig``: every knob of the method, validated, round-tripping through ``adamix_config.json``."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_NAME = "adamix_config.json"

ADAPTER_TYPES = ("bottleneck", "lora")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu")
EVAL_MODES = ("merged", "random", "fixed", "ensemble")
EXPERT_INITS = ("independent", "shared")
# PEFT's names of the model classes whose adapters load without a task record: a sequence classifier, a causal LM.
TASK_TYPES = ("SEQ_CLS", "CAUSAL_LM")
# The reference code's experts at step 0, per adapter type: its bottleneck experts are deep copies of one module
# that the model's ``init_weights`` then redraws one by one (independent draws); its AdaMix-LoRA deep-copies one
# kaiming-uniform A into a ``ParameterList`` that no init touches again (one draw, copied).
REFERENCE_EXPERT_INIT = {"bottleneck": "independent", "lora": "shared"}


@dataclass
class AdaMixConfig:
    """Configuration of an AdaMix mixture of adapters.

    Attributes:
        adapter_type: ``"bottleneck"`` (adapter on every FFN output) or ``"lora"`` (LoRA on attention
            query and value).
        bottleneck_dim: ``r``, the adapter bottleneck size or the LoRA rank.
        num_experts: ``M``, copies of each non-shared projection.
        share_up: one up projection (LoRA ``B``) for all experts; the paper's setting.
        share_down: one down projection (LoRA ``A``) for all experts.
        activation: bottleneck non-linearity: ``"gelu"`` (exact erf), ``"gelu_tanh"`` or ``"relu"``.
        lora_alpha: LoRA scaling numerator; the delta is scaled by ``lora_alpha / bottleneck_dim``.
        lora_dropout: dropout on the LoRA input.
        target_modules: regular expressions matched against the end of module names (at a ``.``
            boundary); ``None`` uses the built-in placement of the architecture.
        modules_to_save: task-head modules (or single parameters, like an LM head's output bias) left
            trainable and saved with the adapter; ``None`` uses the
            architecture's head (``classifier``, ``score``, DeBERTa's fresh ``pooler``).
        consistency_weight: weight ``w`` of the symmetric-KL consistency loss; 0 disables the second pass.
        eval_mode: routing at inference: ``"merged"`` (averaged experts), ``"random"``, ``"fixed"``
            (expert ``eval_expert``) or ``"ensemble"`` (mean of the experts' outputs).
        eval_expert: the expert used by ``eval_mode="fixed"``.
        expert_init: ``"independent"`` draws every expert separately; ``"shared"`` starts all experts from one
            draw. ``None`` (the default) is the reference code's choice for ``adapter_type``
            (``REFERENCE_EXPERT_INIT``): independent N(0, 0.02) bottleneck experts, one kaiming-uniform LoRA
            ``A`` copied to every expert (``B`` is zero either way); resolved on construction.
        seed: routing seed; the expert of every (step, layer, projection) is a pure function of it.
        base_model_name_or_path: the backbone the adapter was trained on (a Hub id or a folder), as PEFT records
            it; what ``adamix_ds.inference.load_for_inference`` loads. ``save_adapter`` records the model's
            ``name_or_path`` where this is ``None``.
        task_type: the model's class as PEFT names it (``TASK_TYPES``): ``"SEQ_CLS"`` (a sequence classifier) or
            ``"CAUSAL_LM"``; ``None`` for other classes. Recorded by ``save_adapter``; with ``label_names`` it is what
            ``load_for_inference`` rebuilds an adapter from when no named task is recorded (``task.json``).
        label_names: a sequence classifier's class names, index = label id (its ``config.id2label`` when saved; one
            name: a regression score, as transformers reads ``num_labels=1``); ``None`` for other models.
    """

    adapter_type: str = "bottleneck"
    bottleneck_dim: int = 16
    num_experts: int = 4
    share_up: bool = True
    share_down: bool = False
    activation: str = "gelu"
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    target_modules: list[str] | None = None
    modules_to_save: list[str] | None = None
    consistency_weight: float = 1.0
    eval_mode: str = "merged"
    eval_expert: int = 0
    expert_init: str | None = None
    seed: int = 0
    base_model_name_or_path: str | None = None
    task_type: str | None = None
    label_names: list[str] | None = None

    def __post_init__(self) -> None:
        _check_choice("adapter_type", self.adapter_type, ADAPTER_TYPES)
        if self.expert_init is None:
            self.expert_init = REFERENCE_EXPERT_INIT[self.adapter_type]
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("eval_mode", self.eval_mode, EVAL_MODES)
        _check_choice("expert_init", self.expert_init, EXPERT_INITS)
        _check_int("bottleneck_dim", self.bottleneck_dim, minimum=1)
        _check_int("num_experts", self.num_experts, minimum=1)
        _check_int("seed", self.seed, minimum=0)
        _check_int("eval_expert", self.eval_expert, minimum=0)
        if self.eval_expert >= self.num_experts:
            raise ValueError(
                f"eval_expert={self.eval_expert} is out of range: allowed 0..{self.num_experts - 1} (num_experts={self.num_experts})"
            )
        for name in ("share_up", "share_down"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: allowed True or False")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout} is invalid: allowed 0 <= lora_dropout < 1")
        if float(self.lora_alpha) <= 0:
            raise ValueError(f"lora_alpha={self.lora_alpha} is invalid: allowed a positive number")
        if float(self.consistency_weight) < 0:
            raise ValueError(f"consistency_weight={self.consistency_weight} is invalid: allowed a number >= 0")
        if self.base_model_name_or_path is not None and not (
            isinstance(self.base_model_name_or_path, str) and self.base_model_name_or_path
        ):
            raise ValueError(f"base_model_name_or_path={self.base_model_name_or_path!r} is invalid: allowed None or a non-empty string")
        if self.task_type is not None:
            _check_choice("task_type", self.task_type, TASK_TYPES)
        for name in ("target_modules", "modules_to_save", "label_names"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value)):
                raise ValueError(f"{name}={value!r} is invalid: allowed None or a list of non-empty strings")
            if value is not None:
                setattr(self, name, list(value))

    @property
    def lora_scaling(self) -> float:
        """LoRA's ``alpha / r``."""
        return float(self.lora_alpha) / self.bottleneck_dim

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form of the config."""
        return dataclasses.asdict(self)

    def save(self, directory: str | Path) -> Path:
        """Write ``adamix_config.json`` into ``directory`` and return its path."""
        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AdaMixConfig:
        """Build a config from a dict; an unknown key is an error, not silently dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown AdaMixConfig field(s) {unknown}: allowed {sorted(known)}")
        return cls(**values)

    @classmethod
    def load(cls, directory: str | Path) -> AdaMixConfig:
        """Read ``adamix_config.json`` from ``directory``; a ``ValueError`` naming the file when it is damaged."""
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
        values = read_json_object(path, "AdaMix config")
        try:
            return cls.from_dict(values)
        except (ValueError, TypeError) as error:  # TypeError: a field of the wrong JSON type
            raise ValueError(f"{path}: {error}") from None


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in the file ``path``; a ``ValueError`` naming ``what`` and the file when the file is not
    UTF-8 JSON or holds another JSON type (the callers check that the file exists)."""
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{what} {path} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} {path} must be a JSON object, got {type(value).__name__}")
    return value


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is invalid: allowed {', '.join(allowed)}")


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid: allowed an integer >= {minimum}")
