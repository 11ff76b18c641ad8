"""The project's modules compiled once per process, not once per workflow run.

The workflow sandbox imports a workflow's module afresh for every run it starts. Without
bytecode files (PYTHONDONTWRITEBYTECODE, which our Dockerfile sets, or a read-only tree) each
of those imports compiles the source again: ~6 ms for workflows/device_onboarding.py, on the
path of every onboarding, most of the cost of starting its run. A code object is immutable:
each import still runs it in a module of its own, only the compilation is shared.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import CodeType, ModuleType

ROOT = Path(__file__).resolve().parents[1]


class CachedSourceLoader(importlib.machinery.SourceFileLoader):
    """A source loader that compiles each file once per (path, modification time)."""

    compiled: dict[tuple[str, int], CodeType] = {}

    def get_code(self, fullname: str) -> CodeType:
        """The module's code: compiled the first time, reused while the file is unchanged."""
        path = self.get_filename(fullname)
        key = (path, os.stat(path).st_mtime_ns)
        code = self.compiled.get(key)
        if code is None:
            code = super().get_code(fullname)
            assert code is not None  # a source file always has code
            self.compiled[key] = code
        return code


class ProjectCodeFinder(importlib.abc.MetaPathFinder):
    """Finds the project's own source modules (those under ROOT) with CachedSourceLoader."""

    def __init__(self) -> None:
        self._ours: dict[str, bool] = {}

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        """The usual spec, with the caching loader, for a module of the project; else None."""
        top = fullname.partition(".")[0]
        if top not in self._ours:
            self._ours[top] = (ROOT / top).is_dir() or (ROOT / f"{top}.py").is_file()
        if not self._ours[top]:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        loader = spec.loader if spec is not None else None
        if spec is None or type(loader) is not importlib.machinery.SourceFileLoader:
            return spec
        spec.loader = CachedSourceLoader(loader.name, loader.path)
        return spec


def cache_project_code() -> bool:
    """Compile the project's modules once per process when no bytecode file may be written
    (with bytecode files, Python's own cache does it); True when the cache is in place."""
    if any(isinstance(finder, ProjectCodeFinder) for finder in sys.meta_path):
        return True
    if not sys.dont_write_bytecode:
        return False
    sys.meta_path.insert(0, ProjectCodeFinder())
    return True
