"""Integrity manifests: the name, size and sha256 of every file of a folder, written last and checked first.

Adapter folders (``save_adapter``) and checkpoints (``save_checkpoint``) carry ``manifest.json``; loading
verifies it before anything else is read, so a truncated, emptied, bit-flipped or missing file is one
``ValueError`` naming the file and what is wrong instead of an error deep inside a file reader, or a
silently wrong tensor.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
_CHUNK = 1 << 20


def file_entry(path: Path) -> dict[str, Any]:
    """Size and sha256 of ``path``, read in chunks (checkpoints can be larger than memory)."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def write_manifest(folder: str | Path) -> Path:
    """Record every file under ``folder`` (recursively, except the manifest) in ``folder/manifest.json``."""
    folder = Path(folder)
    files = {
        path.relative_to(folder).as_posix(): file_entry(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST_NAME
    }
    manifest = folder / MANIFEST_NAME
    manifest.write_text(json.dumps({"format": FORMAT_VERSION, "files": files}, indent=2) + "\n")
    return manifest


def has_manifest(folder: str | Path) -> bool:
    """Whether ``folder`` carries a manifest (folders written by hand or by older versions do not)."""
    return (Path(folder) / MANIFEST_NAME).is_file()


def verify_manifest(folder: str | Path) -> None:
    """Check every file the manifest of ``folder`` lists: present, of its size, of its sha256.

    Raises ``ValueError`` naming the first file that is missing, truncated, of another size or fails its
    checksum, or the manifest itself when it is missing or malformed. Files the manifest does not list are
    not checked (nothing of this library reads them).
    """
    folder = Path(folder)
    manifest = folder / MANIFEST_NAME
    if not manifest.is_file():
        raise ValueError(f"{manifest} is missing: the folder is incomplete (or was written by hand or by an older version)")
    try:
        files = json.loads(manifest.read_text())["files"]
        entries = [(name, int(entry["size"]), str(entry["sha256"])) for name, entry in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError) as error:  # JSON, UTF-8 or structure
        raise ValueError(f"{manifest} is damaged: {type(error).__name__}: {error}") from None
    for name, size, sha256 in entries:
        path = folder / name
        if not path.is_file():
            raise ValueError(f"{path} is missing (listed in {MANIFEST_NAME})")
        actual = path.stat().st_size
        if actual < size:
            raise ValueError(f"{path} is truncated: {actual} of {size} bytes")
        if actual != size:
            raise ValueError(f"{path} has {actual} bytes, {MANIFEST_NAME} says {size}: the file was changed")
        if file_entry(path)["sha256"] != sha256:
            raise ValueError(f"{path} fails its checksum (sha256 differs from {MANIFEST_NAME}): the file is damaged")
