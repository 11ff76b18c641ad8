"""The project's modules are compiled once per process when no bytecode file may be written."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import CodeType, ModuleType

import pytest

from workers import workflow_code
from workers.workflow_code import CachedSourceLoader, ProjectCodeFinder, cache_project_code


@pytest.fixture
def compiles(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The paths compiled from source meanwhile."""
    seen: list[str] = []
    original = CachedSourceLoader.source_to_code

    def counting(self: CachedSourceLoader, data: bytes, path: str, **kwargs: object) -> CodeType:
        seen.append(str(path))
        return original(self, data, path)

    monkeypatch.setattr(CachedSourceLoader, "source_to_code", counting)
    monkeypatch.setattr(CachedSourceLoader, "compiled", {})
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    yield seen


def fresh(name: str) -> ModuleType:
    """Import name into a module of its own, as the workflow sandbox does for each run."""
    parent = importlib.import_module(name.rpartition(".")[0])
    spec = ProjectCodeFinder().find_spec(name, parent.__path__)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_workflow_module_imported_for_each_run_is_compiled_once(compiles: list[str]) -> None:
    first, second = fresh("workflows.device_onboarding"), fresh("workflows.device_onboarding")
    assert first is not second and first.DeviceOnboarding is not second.DeviceOnboarding
    assert [Path(p).name for p in compiles] == ["device_onboarding.py"]


def test_an_edited_module_is_compiled_again(
    compiles: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "edited_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    source = package / "mod.py"
    source.write_text("VALUE = 1\n")
    monkeypatch.setattr(workflow_code, "ROOT", tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert fresh("edited_pkg.mod").VALUE == 1
    source.write_text("VALUE = 2\n")
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 1_000_000))
    assert fresh("edited_pkg.mod").VALUE == 2
    # the package's __init__ too when a worker of this session put the finder in place already
    assert [Path(p).name for p in compiles if Path(p).name == "mod.py"] == ["mod.py", "mod.py"]


def test_modules_outside_the_project_are_left_to_python(compiles: list[str]) -> None:
    assert ProjectCodeFinder().find_spec("json", None) is None


def test_the_cache_is_only_put_in_place_without_bytecode_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path if not isinstance(f, ProjectCodeFinder)])
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    assert cache_project_code() is False
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    assert cache_project_code() is True and isinstance(sys.meta_path[0], ProjectCodeFinder)
    assert cache_project_code() is True and sum(isinstance(f, ProjectCodeFinder) for f in sys.meta_path) == 1
