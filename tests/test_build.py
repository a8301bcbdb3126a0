"""The build's decision function (setup.py): skip the extension with one clear line, never fail.

These call ``setup.extension_plan`` with a fake environment (PATH without a compiler, no torch, ...);
nothing is compiled here.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_mod():
    spec = importlib.util.spec_from_file_location("pysafegeom_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    try:
        spec.loader.exec_module(mod)  # setup() itself only runs under __main__
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


def fake_which(present):
    def which(name, path=None):
        return f"/fake/bin/{name}" if name in present else None

    return which


def torch_cpu():
    return "/fake/torch/share/cmake", None, ""


def torch_cuda():
    return "/fake/torch/share/cmake", "12.4", ""


def no_torch():
    return None, None, "ModuleNotFoundError: No module named 'torch'"


def _one_skip_line(plan):
    assert not plan.build and not plan.cuda
    assert len(plan.notes) == 1
    line = plan.notes[0]
    assert line.startswith("pysafegeom: compiled extension skipped (") and "fallback will be used" in line
    assert "\n" not in line
    return line


def test_no_compiler(setup_mod):
    plan = setup_mod.extension_plan({"PATH": "/nowhere"}, fake_which({"cmake"}), torch_cpu)
    assert "no C++ compiler found" in _one_skip_line(plan)


def test_no_cmake(setup_mod):
    plan = setup_mod.extension_plan({"PATH": "/nowhere"}, fake_which({"c++"}), torch_cpu)
    assert "cmake not found" in _one_skip_line(plan)


def test_no_torch_in_build_env(setup_mod):
    plan = setup_mod.extension_plan({"PATH": "/x"}, fake_which({"cmake", "c++"}), no_torch)
    assert "torch is not importable" in _one_skip_line(plan)


def test_real_path_without_compiler(setup_mod, tmp_path):
    # the real shutil.which on an empty PATH: nothing is found, and nothing raises
    plan = setup_mod.extension_plan({"PATH": str(tmp_path)}, probe_torch=torch_cpu)
    assert "not found" in _one_skip_line(plan)


def test_opt_out(setup_mod):
    plan = setup_mod.extension_plan({"PYSAFEGEOM_NO_EXT": "1"}, fake_which({"cmake", "c++", "nvcc"}), torch_cuda)
    assert "PYSAFEGEOM_NO_EXT" in _one_skip_line(plan)


def test_cpu_build_cuda_skipped_on_cpu_torch(setup_mod):
    plan = setup_mod.extension_plan({"PATH": "/x"}, fake_which({"cmake", "c++", "nvcc"}), torch_cpu)
    assert plan.build and not plan.cuda
    assert len(plan.notes) == 1 and "CUDA kernels skipped (torch here is a CPU-only build)" in plan.notes[0]


def test_cpu_build_no_nvcc(setup_mod):
    plan = setup_mod.extension_plan({"PATH": "/x"}, fake_which({"cmake", "g++"}), torch_cuda)
    assert plan.build and not plan.cuda and plan.cxx == "/fake/bin/g++"
    assert len(plan.notes) == 1 and "nvcc not found" in plan.notes[0]


def test_cuda_build_and_arch(setup_mod):
    which = fake_which({"cmake", "c++", "nvcc"})
    plan = setup_mod.extension_plan({"PATH": "/x"}, which, torch_cuda)
    assert plan.build and plan.cuda and plan.cuda_arch == "90" and plan.notes == []
    plan = setup_mod.extension_plan({"PATH": "/x", "TORCH_CUDA_ARCH_LIST": "8.0 9.0+PTX"}, which, torch_cuda)
    assert plan.cuda_arch == "80;90"
    plan = setup_mod.extension_plan({"PATH": "/x", "PYSAFEGEOM_CUDA_ARCH": "90a", "TORCH_CUDA_ARCH_LIST": "8.0"},
                                    which, torch_cuda)
    assert plan.cuda_arch == "90a"
    plan = setup_mod.extension_plan({"PATH": "/x", "PYSAFEGEOM_NO_CUDA": "1"}, which, torch_cuda)
    assert plan.build and not plan.cuda


def test_failed_build_is_one_line(setup_mod, tmp_path):
    plan = setup_mod.ExtensionPlan(True, False, "90", "/bin/false", "/fake/c++", "/fake/prefix", [])
    so, why = setup_mod.build_library(plan, tmp_path / "b")
    assert so is None and "configure step failed" in why and "\n" not in why


def test_a_library_that_fails_to_load_is_said_once(tmp_path, monkeypatch):
    """A built _C library that cannot load (stale build, another torch) warns once and info names why."""
    import warnings

    import torch

    from pysafegeom.ops import _ext

    bad = tmp_path / "_C.fake.so"
    bad.write_bytes(b"not a shared library")
    monkeypatch.setattr(_ext, "_state", None)
    monkeypatch.setattr(_ext, "library_path", lambda: str(bad))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ok, why = _ext.load()
        again = _ext.load()
    assert not ok and "failed to load" in why and str(bad) in why and again == (ok, why)
    assert [x.category for x in w] == [_ext.ExtensionLoadWarning]
    assert "failed to load" in _ext.build_info()
    monkeypatch.setattr(_ext, "_state", None)  # let the real library load again for later tests
    assert torch is not None
