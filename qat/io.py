"""Writes that are all-or-nothing: a crash never leaves a half-written file under the real name."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp if is_dir else tmp / path.name
    try:
        yield target
        _readable(target)
        if is_dir and path.exists():
            shutil.rmtree(path)
        os.replace(target, path)
    except OSError as err:  # disk full, permissions: say which file, keep the old one
        if str(path) in str(err):
            raise
        raise OSError(err.errno, f"cannot write {path}: {err.strerror or err}") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _readable(target: Path) -> None:
    """Give what was written the modes any new file gets (0644 / 0755 under the usual umask 022):
    mkdtemp's directory is 0700 and some writers (safetensors) create 0600 files, which a server
    running as another user could not read."""
    mask = _umask()
    paths = [target] + (sorted(target.rglob("*")) if target.is_dir() else [])
    for p in paths:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def check_writable(directory: str | os.PathLike, field: str = "output directory") -> None:
    """Create `directory` and write a probe file in it; raise a clear error if that fails.

    Run before any work, so an unwritable output directory fails in a second, not after training.
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-probe."):
            pass
    except OSError as err:
        reason = err.strerror or errno.errorcode.get(err.errno, str(err))
        raise PermissionError(err.errno, f"{field} {directory} is not writable ({reason})") from err


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def first_difference(a: Any, b: Any, key: str) -> tuple[str, Any, Any] | None:
    """The first field where two nested config dicts differ, as (dotted key, a's value, b's), or
    None when they are equal: what a resume that finds files of another config names."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            found = first_difference(a.get(k), b.get(k), f"{key}.{k}")
            if found is not None:
                return found
        return None
    return None if a == b else (key, a, b)


def is_rank_zero() -> bool:
    """Whether this process writes the run's files and prints its reports: rank 0 by the
    launcher's variables (those Lightning reads before a Trainer exists), or no launcher at all."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(key) is not None:
            return int(os.environ[key]) == 0
    return True


_LIBC: Any = None


def release_memory() -> None:
    """Hand the C heap's free pages back to the kernel (glibc's malloc_trim; elsewhere a no-op).

    glibc keeps freed chunks below its (self-raising) mmap threshold in the heap, and tensors
    freed between ones still alive leave holes it never returns: a stage that reads, quantizes
    and drops block after block would grow by about a block each time without this."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC = libc if hasattr(libc, "malloc_trim") else False
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)
