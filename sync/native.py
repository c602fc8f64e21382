"""Native libraries built once per machine, into a cache directory named for everything that makes them.

A build lives in ``$RLSYNC_CACHE_DIR`` (or ``~/.cache/rlsync``) under a directory whose name hashes its
source, flags and whatever else it was compiled against: another compiler flag, torch, Python or CPU gets
a build of its own. One process builds at a time, under an ``fcntl`` lock (which the OS releases when its
holder dies, so a build killed midway blocks nobody); the build is marked ``ready`` (the library's path,
written atomically) once it loads, and every later process loads that library directly.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path
from typing import Callable, TypeVar

__all__ = ["cache_root", "build_directory", "load_ready", "build_once"]

T = TypeVar("T")


def cache_root() -> Path:
    cache = os.environ.get("RLSYNC_CACHE_DIR")
    if cache:
        return Path(cache)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rlsync"


def build_directory(prefix: str, *made_of: str) -> Path:
    """``<cache>/<prefix>_<hash of made_of>``."""
    digest = hashlib.sha256("\0".join(made_of).encode()).hexdigest()[:16]
    return cache_root() / f"{prefix}_{digest}"


def load_ready(directory: Path, load: Callable[[str], T]) -> T | None:
    """What ``load`` makes of the library built in ``directory``, if it is marked ready and loads; else None."""
    ready = directory / "ready"
    if not ready.exists():
        return None
    try:
        return load(ready.read_text())
    except (ImportError, OSError, AttributeError):
        return None  # built again, which replaces it


def build_once(directory: Path, compile: Callable[[Path], tuple[str, T]], load: Callable[[str], T]) -> T:
    """The library of ``directory``: loaded if ready, else built by ``compile(directory)`` -- which returns
    the library's path and what it loaded -- and marked ready. Waits while another process builds it."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "building", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        loaded = load_ready(directory, load)
        if loaded is not None:
            return loaded
        path, loaded = compile(directory)
        partial = directory / f"ready.{os.getpid()}"
        partial.write_text(path)
        os.replace(partial, directory / "ready")  # others load the library only once it is whole
        return loaded
