"""adamix-ds: AdaMix (mixture-of-adaptations) for Hugging Face models, trained with DeepSpeed."""

from adamix_ds.checkpointing import enable_activation_checkpointing, routing_context_fn
from adamix_ds.config import AdaMixConfig
from adamix_ds.consistency import AdaMixLoss, adamix_loss, consistency_loss
from adamix_ds.io import export_peft, load_adapter, save_adapter
from adamix_ds.layer import AdaMixBottleneck, AdaMixLayer, AdaMixLoRA
from adamix_ds.model import add_adamix, count_parameters, merge_adamix, set_eval_mode
from adamix_ds.optim import ExpertStepGuard, TorchOptimizerAccess, build_adamw
from adamix_ds.routing import choose_expert

__version__ = "0.1.0"

__all__ = [
    "AdaMixBottleneck",
    "AdaMixConfig",
    "AdaMixLayer",
    "AdaMixLoRA",
    "AdaMixLoss",
    "ExpertStepGuard",
    "TorchOptimizerAccess",
    "adamix_loss",
    "add_adamix",
    "build_adamw",
    "choose_expert",
    "consistency_loss",
    "count_parameters",
    "enable_activation_checkpointing",
    "export_peft",
    "load_adapter",
    "merge_adamix",
    "routing_context_fn",
    "save_adapter",
    "set_eval_mode",
]
