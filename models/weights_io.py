"""Save and load shipped model weights with a SHA-256 pin.

A weights file is only trusted if its SHA-256 equals the one recorded beside it (``<file>.sha256``, the
``sha256sum`` format) or given by the caller (a model card, a bundle manifest). A mismatch means the file was
changed, truncated or swapped, and the analyzer must refuse to run rather than return numbers from a model
nobody validated. Files are read with ``torch.load(weights_only=True)``, which never unpickles code.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from core.errors import ConfigurationError

_CHUNK = 1 << 20


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def read_pinned_sha256(path: Path) -> str:
    """The expected hash recorded in ``<file>.sha256`` (first token of its first line)."""
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        raise ConfigurationError(
            f"Weights file {path.name} has no recorded SHA-256 ({sidecar.name} is missing).",
            remedy="Reinstall the model weights with their .sha256 file; unpinned weights are never loaded.",
        )
    tokens = sidecar.read_text(encoding="ascii").split()
    if not tokens or len(tokens[0]) != 64:
        raise ConfigurationError(
            f"{sidecar.name} does not hold a SHA-256 hex digest.",
            remedy="Write it as `sha256sum` does: 64 hex characters, two spaces, the file name.",
        )
    return tokens[0].lower()


def verify_sha256(path: Path, expected_sha256: str | None = None) -> str:
    """Check ``path`` against ``expected_sha256`` (or its sidecar); returns the hash, raises on mismatch."""
    if not path.is_file():
        raise ConfigurationError(
            f"Weights file {path} does not exist.", remedy="Reinstall the package or retrain the model."
        )
    expected = (expected_sha256 or read_pinned_sha256(path)).lower()
    actual = sha256_of_file(path)
    if actual != expected:
        raise ConfigurationError(
            f"Weights file {path.name} failed its integrity check: expected SHA-256 {expected}, got {actual}.",
            remedy="The file was modified or replaced; reinstall the shipped weights or retrain with "
            "`python -m models.training.train_medmnist` and review the new model card before use.",
        )
    return actual


def load_checked(path: Path, expected_sha256: str | None = None) -> dict[str, Any]:
    """Verify the hash, then load the checkpoint dictionary without executing pickled code."""
    verify_sha256(path, expected_sha256)
    import torch  # only loading needs torch; hashing and pin checks serve torch-free callers (the registry)

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict):
        raise ConfigurationError(
            f"Weights file {path.name} does not hold a checkpoint dictionary.",
            remedy="Use weights written by models.training.train_medmnist.",
        )
    return checkpoint


def save_pinned(checkpoint: dict[str, Any], path: Path) -> str:
    """Write the checkpoint and its ``.sha256`` sidecar; returns the hash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    import torch

    torch.save(checkpoint, path)
    digest = sha256_of_file(path)
    sidecar_path(path).write_text(f"{digest}  {path.name}\n", encoding="ascii")
    return digest
