"""Build script: the metadata is in pyproject.toml; this file only builds the compiled extension.

The extension is one plain shared library, ``pysafegeom/_C.so`` (op schema + CPU kernels, and the CUDA
kernels when nvcc and a CUDA build of torch are both present), built by CMake against the torch of the
build environment. It is optional: when torch is not importable at build time (an isolated build),
or cmake or a C++ compiler is missing, or the build fails, one line says so and the install goes on
without it, and the pure-PyTorch fallback is used at run time.

Environment: ``PYSAFEGEOM_NO_EXT=1`` skips the extension; ``PYSAFEGEOM_NO_CUDA=1`` skips only CUDA;
``PYSAFEGEOM_CUDA_ARCH`` (e.g. ``90`` or ``80;90``) or ``TORCH_CUDA_ARCH_LIST`` (e.g. ``9.0``) sets
the CUDA architectures (default sm_90); ``PYSAFEGEOM_BUILD_VERBOSE=1`` shows CMake's output;
``MAX_JOBS`` limits parallel compile jobs.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
FALLBACK = "the PyTorch fallback will be used"


@dataclasses.dataclass
class ExtensionPlan:
    build: bool  # build the CPU extension at all
    cuda: bool  # also compile csrc/cuda
    cuda_arch: str  # CMAKE_CUDA_ARCHITECTURES value
    cmake: str | None
    cxx: str | None
    torch_prefix: str | None  # torch.utils.cmake_prefix_path
    notes: list[str]  # one-line messages to print (the skip reason, or why CUDA is off)


def _probe_torch() -> tuple[str | None, str | None, str]:
    """(cmake_prefix_path, torch.version.cuda, error) of the torch importable here."""
    try:
        import torch
        import torch.utils

        return torch.utils.cmake_prefix_path, torch.version.cuda, ""
    except Exception as exc:  # noqa: BLE001 - any import failure means: no torch to build against
        return None, None, f"{type(exc).__name__}: {exc}"


def _cuda_arch(env) -> str:
    arch = env.get("PYSAFEGEOM_CUDA_ARCH", "").strip()
    if arch:
        return arch.replace(",", ";").replace(" ", ";")
    tal = env.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if tal:  # "8.0 9.0+PTX" -> "80;90"
        archs = []
        for a in tal.replace(";", " ").replace(",", " ").split():
            a = a.replace("+PTX", "").replace("a", "")
            if a.replace(".", "").isdigit():
                archs.append(a.replace(".", ""))
        if archs:
            return ";".join(archs)
    return "90"


def extension_plan(env=None, which=shutil.which, probe_torch=_probe_torch) -> ExtensionPlan:
    """Decide what to build from the environment; never raises. ``notes`` holds the lines to print."""
    env = os.environ if env is None else env

    def skip(why: str) -> ExtensionPlan:
        return ExtensionPlan(False, False, "", None, None, None,
                             [f"pysafegeom: compiled extension skipped ({why}); {FALLBACK}"])

    if env.get("PYSAFEGEOM_NO_EXT", "") not in ("", "0"):
        return skip("PYSAFEGEOM_NO_EXT is set")
    prefix, torch_cuda, err = probe_torch()
    if prefix is None:
        return skip("torch is not importable in the build environment; "
                    "build with `pip install --no-build-isolation` to compile it")
    cmake = which("cmake", path=env.get("PATH"))
    if cmake is None:
        return skip("cmake not found")
    cxx = None
    for cand in [env.get("CXX", "")] + ["c++", "g++", "clang++"]:
        if cand and which(cand, path=env.get("PATH")):
            cxx = which(cand, path=env.get("PATH"))
            break
    if cxx is None:
        return skip("no C++ compiler found")
    notes = []
    cuda = False
    arch = _cuda_arch(env)
    nvcc = which("nvcc", path=env.get("PATH"))
    if nvcc is None and env.get("CUDA_HOME"):
        cand = Path(env["CUDA_HOME"]) / "bin" / "nvcc"
        nvcc = str(cand) if cand.exists() else None
    if env.get("PYSAFEGEOM_NO_CUDA", "") not in ("", "0"):
        notes.append("pysafegeom: CUDA kernels skipped (PYSAFEGEOM_NO_CUDA is set); building the CPU kernels")
    elif torch_cuda is None:
        if nvcc is not None:  # only worth a line when someone might have expected CUDA
            notes.append("pysafegeom: CUDA kernels skipped (torch here is a CPU-only build); building the CPU kernels")
    elif nvcc is None:
        notes.append("pysafegeom: CUDA kernels skipped (nvcc not found); building the CPU kernels")
    else:
        cuda = True
    return ExtensionPlan(True, cuda, arch, cmake, cxx, prefix, notes)


def _say(line: str) -> None:
    # pip hides a successful build's stdout unless -v; stderr lines at least reach the log.
    print(line, file=sys.stderr, flush=True)


def build_library(plan: ExtensionPlan, build_dir: Path, verbose: bool = False) -> tuple[Path | None, str]:
    """Run CMake; return (path of the built _C.so, '') or (None, one-line reason)."""
    build_dir.mkdir(parents=True, exist_ok=True)
    cfg = [
        plan.cmake, "-S", str(ROOT), "-B", str(build_dir),
        f"-DCMAKE_PREFIX_PATH={plan.torch_prefix}",
        f"-DCMAKE_CXX_COMPILER={plan.cxx}",
        "-DCMAKE_BUILD_TYPE=Release",
        f"-DPYSAFEGEOM_WITH_CUDA={'ON' if plan.cuda else 'OFF'}",
        f"-DPYSAFEGEOM_CUDA_ARCH={plan.cuda_arch or '90'}",
    ]
    if shutil.which("ninja"):
        cfg += ["-G", "Ninja"]
    jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
    steps = [cfg, [plan.cmake, "--build", str(build_dir), "--config", "Release", "-j", jobs]]
    for cmd in steps:
        res = subprocess.run(cmd, capture_output=not verbose, text=True)
        if res.returncode != 0:
            log = build_dir / "pysafegeom-build.log"
            if not verbose:
                log.write_text(f"$ {' '.join(cmd)}\n{res.stdout}\n{res.stderr}")
            return None, f"the {'configure' if cmd is cfg else 'compile'} step failed, see {log}"
    so = build_dir / "_C.so"
    if not so.exists():
        return None, f"CMake finished but {so} is missing"
    return so, ""


try:
    from setuptools import find_packages, Extension, setup
    from setuptools.command.build_ext import build_ext
except ImportError:  # pragma: no cover - setuptools is a build requirement
    raise


class CMakeBuild(build_ext):
    """Builds ``pysafegeom._C`` with CMake, or skips it with one line."""

    def get_ext_filename(self, fullname):
        # A plain shared library for torch.ops.load_library, not a Python module: no ABI tag.
        return os.path.join(*fullname.split(".")) + ".so"

    def _skip(self):
        # A library left in build/lib by an earlier build must not slip into this wheel.
        if not self.inplace:
            for ext in self.extensions:
                stale = Path(self.get_ext_fullpath(ext.name))
                if stale.exists():
                    stale.unlink()
        self.extensions = []

    def run(self):
        plan = extension_plan()
        for line in plan.notes:
            _say(line)
        if not plan.build:
            self._skip()
            return
        verbose = os.environ.get("PYSAFEGEOM_BUILD_VERBOSE", "") not in ("", "0")
        # A persistent folder in the tree (ignored by git) makes rebuilds incremental and keeps the log.
        build_dir = ROOT / "build" / f"ext-py{sys.version_info[0]}{sys.version_info[1]}"
        if not os.access(ROOT, os.W_OK):
            build_dir = Path(self.build_temp).resolve() / "cmake"
        try:
            so, why = build_library(plan, build_dir, verbose)
        except Exception as exc:  # noqa: BLE001 - a failed build must not fail the install
            so, why = None, f"{type(exc).__name__}: {exc}"
        if so is None:
            _say(f"pysafegeom: compiled extension skipped ({why}); {FALLBACK}")
            self._skip()
            return
        for ext in self.extensions:
            dest = Path(self.get_ext_fullpath(ext.name))
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(so, dest)
        _say(f"pysafegeom: compiled extension built ({'cpu+cuda sm_' + plan.cuda_arch if plan.cuda else 'cpu'})")


if __name__ == "__main__":
    setup(
        # every pysafegeom subpackage, plus the top-level kernels/ folder installed as pysafegeom.kernels
        packages=find_packages(include=["pysafegeom", "pysafegeom.*"]) + ["pysafegeom.kernels"],
        ext_modules=[Extension("pysafegeom._C", sources=[])],
        cmdclass={"build_ext": CMakeBuild},
    )
