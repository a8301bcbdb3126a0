"""Loader of the compiled extension ``pysafegeom/_C.so`` shared by the C++ and CUDA backends.

The library registers the ``torch.ops.pysafegeom.*`` ops (schema in ``csrc/ops.cpp``) with CPU kernels
and, when it was built with CUDA, CUDA kernels. It is loaded once, with ``torch.ops.load_library``.
"""

from __future__ import annotations

import glob
import os

import torch

_HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the pysafegeom package folder
_state: tuple[bool, str] | None = None

class ExtensionLoadWarning(RuntimeWarning):
    """A built ``_C`` library exists but cannot be loaded (said once per process)."""


NOT_BUILT = ("extension not built: run `make install` or `pip install --no-build-isolation -e .` "
             "(needs cmake, a C++ compiler and torch at build time)")


def library_path() -> str | None:
    """Path of the built library in the package folder, or None."""
    found = sorted(glob.glob(os.path.join(_HERE, "_C*.so")))
    return found[0] if found else None


def load() -> tuple[bool, str]:
    """(True, '') once the library is loaded, else (False, reason). Loads at most once per process."""
    global _state
    if _state is None:
        path = library_path()
        if path is None:
            _state = (False, NOT_BUILT)
        else:
            try:
                torch.ops.load_library(path)
                torch.ops.pysafegeom.build_info()
                _state = (True, "")
            except (OSError, RuntimeError, AttributeError) as exc:  # a stale build against another torch, a missing symbol
                _state = (False, f"extension at {path} failed to load ({type(exc).__name__}: {exc}); "
                                 "rebuild it with `make install` against this torch")
                # a library that is there but cannot load is said once, on first use (and in `pysafegeom info`)
                import warnings

                warnings.warn(f"pysafegeom: {_state[1]}; the PyTorch reference ops run instead", ExtensionLoadWarning,
                              stacklevel=3)
    return _state


def build_info() -> str:
    """What the library was built with ('cpu (openmp)', 'cpu (openmp)+cuda sm_90'), or why it is absent."""
    ok, why = load()
    if not ok:
        return why
    return str(torch.ops.pysafegeom.build_info())


def has_cuda_kernels() -> bool:
    """Whether the loaded library was compiled with the CUDA kernels."""
    return load()[0] and "cuda" in str(torch.ops.pysafegeom.build_info())


# --- op wrappers (the backend contract of pysafegeom.ops); torch dispatches CPU or CUDA by device ----

def _ops():
    return torch.ops.pysafegeom


def gather_positions(hidden, positions, out):
    _ops().gather_positions(hidden, positions, out)


def gather_accumulate(hidden, positions, groups, sums, counts, comp):
    _ops().gather_accumulate(hidden, positions, groups, sums, counts, comp)


def project_ablate(x, Q, beta, alpha, v, out, proj):
    _ops().project_ablate(x, Q, float(beta), float(alpha), v, out, proj)


def orthogonalize_weight(W, Q, residual_dim, out):
    _ops().orthogonalize_weight(W, Q, int(residual_dim), out)


def chunked_cross_entropy(h, W, targets, chunk_size, ignore_index, loss, grad):
    _ops().chunked_cross_entropy(h, W, targets, int(chunk_size), int(ignore_index), loss, grad)


def masked_topk(grad, k, forbidden, current):
    return _ops().masked_topk(grad, int(k), forbidden, current)
