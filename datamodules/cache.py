"""On-disk cache of processed datasets and statistics.

Cache files live next to the data, in ``<data dir>/.pyg_equireann_cache/<name>-<hash>.pt``; when
that folder cannot be written (read-only data) they go to ``$PYG_EQUIREANN_CACHE`` or
``~/.cache/pyg_equireann``. The hash covers everything the content depends on (file path, size,
mtime and content hash, cutoff, keys, dtype, :data:`CACHE_VERSION`), so a changed file or cutoff
simply gives a new cache file. Files are written atomically (temporary file + ``os.replace``) and
hold only tensors and plain Python values (loaded with ``torch.load(weights_only=True)``).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch

#: Bump when the processed format or processing code changes (invalidates all caches).
CACHE_VERSION = 2
CACHE_DIRNAME = ".pyg_equireann_cache"
#: Files up to this size are hashed by content in addition to size and mtime.
CONTENT_HASH_MAX_BYTES = 256 * 1024 * 1024


def fallback_cache_dir() -> Path:
    env = os.environ.get("PYG_EQUIREANN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pyg_equireann"


def file_fingerprint(path: str | os.PathLike) -> dict:
    """Absolute path, size, mtime and (for files up to 256 MB) the SHA-256 of the content."""
    p = Path(path).expanduser().resolve()
    st = p.stat()
    fp = {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if st.st_size <= CONTENT_HASH_MAX_BYTES:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        fp["sha256"] = h.hexdigest()
    return fp


def make_key(*parts: Any) -> str:
    """Stable short hash of JSON-serialisable parts (plus :data:`CACHE_VERSION`)."""
    text = json.dumps([CACHE_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _writable_dir(folder: Path) -> bool:
    try:
        new = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        if new:  # keep the cache out of version control
            (folder / ".gitignore").write_text("*\n")
        return os.access(folder, os.W_OK | os.X_OK)
    except OSError:
        return False


def cache_candidates(data_file: str | os.PathLike, name: str, key: str) -> list[Path]:
    data_dir = Path(data_file).expanduser().resolve().parent
    fname = f"{name}-{key}.pt"
    return [data_dir / CACHE_DIRNAME / fname, fallback_cache_dir() / fname]


def load_cache(path: Path) -> Optional[Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt / incompatible file: recompute
        warnings.warn(f"ignoring unreadable cache file {path}: {exc}")
        return None


def save_cache(obj: Any, candidates: list[Path]) -> Optional[Path]:
    """Write ``obj`` atomically to the first writable candidate; returns the path (or None)."""
    for path in candidates:
        if not _writable_dir(path.parent):
            continue
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
            with os.fdopen(fd, "wb") as f:
                torch.save(obj, f)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, path)
            return path
        except OSError:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
    warnings.warn(f"could not write cache file {candidates[0].name} to any of {[str(c.parent) for c in candidates]}")
    return None


def cached(data_file: str | os.PathLike, name: str, key: str, compute: Callable[[], Any], enabled: bool = True) -> Any:
    """Return the cached value for (``name``, ``key``) next to ``data_file``, else ``compute()`` it and store it."""
    if not enabled:
        return compute()
    candidates = cache_candidates(data_file, name, key)
    for path in candidates:
        if path.is_file():
            obj = load_cache(path)
            if obj is not None:
                return obj
    obj = compute()
    save_cache(obj, candidates)
    return obj
