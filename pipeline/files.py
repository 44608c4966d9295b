"""Files that are either complete or absent: the one atomic-write helper, `.partial`
artifacts, provenance fingerprints.

Every file the pipeline writes goes through :func:`atomic_write` (a temporary file in
the same folder, fsync, rename), so a reader, or a stage killed half way, never sees
half a file. Whole artifacts (a Zarr store, an HDF5 file, a folder of PNGs) are built
under ``<name>.partial`` and swapped in by :func:`commit`. This module imports nothing
heavy: settings, the manifest and the report use it as well as the stages.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import IO, Any, Callable, Iterator


# ----------------------------------------------------------------------------- atomic files
@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on success it is flushed, fsynced
    and renamed to ``path``; on an exception it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique hidden name in the same folder (a rename across file systems is not atomic);
    # open() rather than mkstemp so the file gets the usual permissions (umask), not 0600.
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write(path: str | Path, data: bytes | str | Callable[[IO], None]) -> Path:
    """Write ``data`` to ``path`` atomically: bytes, text, or a function that writes to the
    open binary handle (``lambda f: torch.save(obj, f)``, ``lambda f: fig.savefig(f)``)."""
    with atomic_open(path, "wb") as handle:
        if callable(data):
            data(handle)
        else:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def write_json(path: str | Path, payload: Any) -> Path:
    """``payload`` as indented JSON (numpy values and paths converted), atomically."""
    return atomic_write(path, json.dumps(payload, indent=2, default=json_default) + "\n")


def json_default(value: Any) -> Any:
    """`json.dumps(default=...)` for numpy scalars and arrays and paths."""
    import numpy as np

    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# ----------------------------------------------------------------------------- whole artifacts
def partial_path(final: str | Path) -> Path:
    """Where an artifact is built before it is renamed into place."""
    final = Path(final)
    return final.with_name(final.name + ".partial")


def remove(path: str | Path) -> None:
    """Remove a file, link or folder; nothing when it does not exist."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def commit(partial: str | Path, final: str | Path) -> Path:
    """Replace ``final`` by the complete ``partial`` (file or folder) as one rename.

    A folder cannot be swapped by one rename over an existing one, so the old one is
    first moved aside; it is removed only after the new one is in place.
    """
    partial, final = Path(partial), Path(final)
    old = final.with_name(final.name + ".old")
    remove(old)
    if final.exists():
        os.replace(final, old)
    os.replace(partial, final)
    remove(old)
    return final


def resume_or_restart(partial: Path, check: Callable[[Path], None], stage: str,
                      log: Callable[[str], None]) -> bool:
    """Whether the `.partial` artifact left by an interrupted run can be resumed.

    ``check(partial)`` raises when it cannot (written with other settings, another
    shape, a damaged file); then it is removed, and the one-line reason logged, so the
    stage starts over. Returns True when there is a resumable partial artifact.
    """
    if not partial.exists():
        return False
    try:
        check(partial)
        return True
    except Exception as exc:  # noqa: BLE001 - any reason not to resume means: start over
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log(f"{stage}: not resuming {partial} ({reason}); starting over")
        remove(partial)
        return False


# ----------------------------------------------------------------------------- provenance
def fingerprint(payload: Any) -> str:
    """Stable sha256 of a JSON-able value (sorted keys)."""
    text = json.dumps(payload, sort_keys=True, default=json_default)
    return hashlib.sha256(text.encode()).hexdigest()


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()
