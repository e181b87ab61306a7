"""GGUF checkpoints (llama.cpp's format) as ordinary Hugging Face model folders, converted once and cached.

transformers reads a GGUF file by dequantising every tensor (about 35 s for SmolLM2-135M on 2 CPU cores),
on every load. ``gguf_model_folder`` does it once per file: the model (float32 safetensors), its config and
its tokenizer go to ``~/.cache/adamix-ds/gguf/<name>-<sha256 prefix>/`` (``ADAMIX_DS_CACHE`` moves the
root), which ``from_pretrained`` then loads in a second. The key is the file's content hash, so a changed
file converts again; concurrent ranks convert once (a file lock), and a folder appears whole or not at all.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["cache_root", "gguf_model_folder", "is_gguf"]

GGUF_SUFFIX = ".gguf"


def cache_root() -> Path:
    """Where converted checkpoints live: ``$ADAMIX_DS_CACHE`` or ``~/.cache/adamix-ds``."""
    return Path(os.environ.get("ADAMIX_DS_CACHE", Path.home() / ".cache" / "adamix-ds"))


def is_gguf(name: str) -> bool:
    """Whether ``--model_name_or_path`` names a GGUF file."""
    return name.lower().endswith(GGUF_SUFFIX)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_model_folder(path: str | os.PathLike[str]) -> Path:
    """The cached Hugging Face folder of the GGUF checkpoint ``path`` (converting it on first use).

    ``FileNotFoundError`` for a missing file; ``ValueError`` naming the file when transformers cannot read it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model_name_or_path={path}: no such GGUF file")
    root = cache_root() / "gguf"
    folder = root / f"{path.stem}-{_sha256(path)[:16]}"
    if (folder / "config.json").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    with (root / f".{folder.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another rank may be converting the same file
        if not (folder / "config.json").is_file():
            _convert(path, folder)
    return folder


def _convert(path: Path, folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise ValueError(f"model_name_or_path={path}: transformers cannot read this GGUF file: {error}") from None
        # The tensors are plain float32 now; the quantizer left on the model only makes save_pretrained
        # refuse, and its config entry would make from_pretrained look for the GGUF file again.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        os.replace(scratch, folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
