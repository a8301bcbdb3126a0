"""Triton backend: the kernels of ``pysafegeom.kernels`` (top-level ``kernels/`` in the source tree).

Runs on CUDA GPUs, and on CPU tensors when ``TRITON_INTERPRET=1`` makes Triton interpret the kernels
in Python (slow; for testing). Never chosen automatically on CPU (see ``_backends.PREFERENCE``).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pathlib
import sys

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

INTERPRET_HINT = "set TRITON_INTERPRET=1 to run the kernels in the interpreter on CPU (slow; for testing)"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _devices() -> tuple[str, ...]:
    return ("cuda", "cpu") if _interpreting() else ("cuda",)


DEVICES = _devices()

_kernels = None  # the pysafegeom.kernels module once imported
_import_error: str | None = None


def _import_kernels():
    """``pysafegeom.kernels``; in a source tree that is not installed, the top-level ``kernels/`` folder."""
    try:
        return importlib.import_module("pysafegeom.kernels")
    except ModuleNotFoundError as exc:
        if exc.name not in ("pysafegeom.kernels",):
            raise
    # Not installed (or installed without the package-dir mapping): load ../../kernels by path.
    folder = pathlib.Path(__file__).resolve().parents[2] / "kernels"
    init = folder / "__init__.py"
    if not init.is_file():
        raise ModuleNotFoundError(
            f"pysafegeom.kernels is not installed and {folder} does not exist; reinstall pysafegeom (pip install -e .)"
        )
    spec = importlib.util.spec_from_file_location("pysafegeom.kernels", init, submodule_search_locations=[str(folder)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["pysafegeom.kernels"] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop("pysafegeom.kernels", None)
        raise
    return mod


def available() -> tuple[bool, str]:
    """(True, '') when the kernels can run here, else (False, why)."""
    global DEVICES, _kernels, _import_error
    DEVICES = _devices()
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install 'pysafegeom[triton]')"
    if not _interpreting() and not torch.cuda.is_available():
        return False, f"no CUDA GPU is visible; {INTERPRET_HINT}"
    if _kernels is None and _import_error is None:
        try:
            _kernels = _import_kernels()
        except Exception as exc:  # report, do not crash the dispatcher
            _import_error = f"the Triton kernels failed to import: {type(exc).__name__}: {exc}"
    if _kernels is None:
        return False, _import_error
    return True, ""


def _k():
    if _kernels is None:
        ok, why = available()
        if not ok:
            raise RuntimeError(f"Triton backend unavailable: {why}")
    return _kernels


# --- backend contract (see pysafegeom/ops/__init__.py) --------------------------------------------

def gather_positions(hidden, positions, out):
    _k().gather_positions(hidden, positions, out)


def gather_accumulate(hidden, positions, groups, sums, counts, comp):
    _k().gather_accumulate(hidden, positions, groups, sums, counts, comp)


def project_ablate(x, Q, beta, alpha, v, out, proj):
    _k().project_ablate(x, Q, beta, alpha, v, out, proj)


def orthogonalize_weight(W, Q, residual_dim, out):
    _k().orthogonalize_weight(W, Q, residual_dim, out)


def chunked_cross_entropy(h, W, targets, chunk_size, ignore_index, loss, grad):
    _k().chunked_cross_entropy(h, W, targets, chunk_size, ignore_index, loss, grad)


def masked_topk(grad, k, forbidden, current):
    return _k().masked_topk(grad, k, forbidden, current)
