"""Save and load shipped model weights with a SHA-256 pin.

A weights file is only trusted if its SHA-256 equals the one recorded beside it (``<file>.sha256``, the
``sha256sum`` format) or given by the caller (a model card, a bundle manifest). A mismatch means the file was
changed, truncated or swapped, and the analyzer must refuse to run rather than return numbers from a model
nobody validated. Files are read with ``torch.load(weights_only=True)``, which never unpickles code, or - for
the analyzers, which run their small networks in numpy - by :func:`load_checked_arrays`, which reads the same
file without importing torch (about 2 s of CPU a command-line analysis need not pay) and accepts, like
``weights_only``, nothing but tensors, numbers, strings and containers.
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

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


_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


def load_checked_arrays(path: Path, expected_sha256: str | None = None) -> dict[str, Any]:
    """Verify the hash, then read a ``torch.save`` checkpoint with every tensor as a numpy array, without torch.

    The file is the zip ``torch.save`` writes: ``data.pkl`` (the object tree, tensors as references to raw
    little-endian storages) and ``data/<key>`` (the storages). The pickle is read by :class:`_ArrayUnpickler`,
    which knows exactly four names - ``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2`` and the typed
    storages - and refuses any other, so no code in the file can run.
    """
    verify_sha256(path, expected_sha256)
    with zipfile.ZipFile(path) as archive:
        pickled = next((name for name in archive.namelist() if name.endswith("/data.pkl")), None)
        byteorder = next((name for name in archive.namelist() if name.endswith("/byteorder")), None)
        if pickled is None or (byteorder is not None and archive.read(byteorder).strip() != b"little"):
            raise ConfigurationError(
                f"Weights file {path.name} is not a little-endian torch.save archive.",
                remedy="Use weights written by models.training.train_medmnist.",
            )
        root = pickled.rsplit("/", 1)[0]
        with archive.open(pickled) as handle:
            checkpoint = _ArrayUnpickler(handle, archive, root, path.name).load()
    if not isinstance(checkpoint, dict):
        raise ConfigurationError(
            f"Weights file {path.name} does not hold a checkpoint dictionary.",
            remedy="Use weights written by models.training.train_medmnist.",
        )
    return checkpoint


class _ArrayUnpickler(pickle.Unpickler):
    """The tensor-only subset of torch's checkpoint pickles, rebuilt as numpy arrays."""

    def __init__(self, handle: Any, archive: zipfile.ZipFile, root: str, file_name: str) -> None:
        super().__init__(handle)
        self._archive, self._root, self._file_name = archive, root, file_name
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_array
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise ConfigurationError(
            f"Weights file {self._file_name} refers to {module}.{name}, which a weights file never needs.",
            remedy="Use weights written by models.training.train_medmnist; never load weights from elsewhere.",
        )

    def persistent_load(self, pid: Any) -> np.ndarray:
        kind, dtype, key, _location, _count = pid
        if kind != "storage" or dtype not in _STORAGE_DTYPES.values():
            raise ConfigurationError(f"Weights file {self._file_name} holds an unknown storage {kind!r}.")
        if key not in self._storages:
            raw = self._archive.read(f"{self._root}/data/{key}")
            self._storages[key] = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))
        return self._storages[key]


def _rebuild_array(
    storage: np.ndarray, offset: int, size: tuple[int, ...], stride: tuple[int, ...], *_: Any
) -> np.ndarray:
    """A tensor's view of its storage (offset, shape and strides in elements), copied into its own array."""
    if not size:
        return np.array(storage[offset])
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=tuple(step * storage.itemsize for step in stride), writeable=False
    )
    return np.array(view)
