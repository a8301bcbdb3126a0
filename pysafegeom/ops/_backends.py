"""Backend registry: which op implementations exist here, and why the others do not.

A backend module exposes ``available() -> (bool, reason)``, ``DEVICES`` (device types it runs on),
``DTYPES`` (floating input dtypes it accepts) and, for each op it implements, a function with the
*backend contract* of that op (see ``pysafegeom/ops/__init__.py``: inputs already validated,
contiguous, outputs allocated by the caller).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

BACKENDS = ("torch", "cpp", "cuda", "triton")
ENV_VAR = "PYSAFEGEOM_BACKEND"

# Automatic choice, fastest first, per device type. The Triton interpreter is never chosen
# automatically on CPU: it exists for testing, not speed.
PREFERENCE = {
    "cpu": ("cpp", "torch"),
    "cuda": ("cuda", "triton", "torch"),
}

_cache: dict[str, tuple[ModuleType | None, str]] = {}


def load(name: str) -> tuple[ModuleType | None, str]:
    """The backend module and '' if it can run here, else (None, reason)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "torch":
        from . import reference

        return reference, ""
    if name not in _cache:
        try:
            mod = importlib.import_module(f"pysafegeom.ops._{name}")
            ok, why = mod.available()
        except Exception as exc:  # an import error is a reason, not a crash
            mod, ok, why = None, False, f"{type(exc).__name__}: {exc}"
        _cache[name] = (mod if ok else None, "" if ok else why)
    return _cache[name]


def forced() -> str | None:
    """The backend named by PYSAFEGEOM_BACKEND, or None for automatic choice."""
    val = os.environ.get(ENV_VAR, "").strip().lower()
    if not val or val == "auto":
        return None
    if val not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={val!r} is not a backend; use one of {', '.join(BACKENDS)} or 'auto'")
    return val


def report() -> dict[str, str]:
    """{backend: 'available' or the reason it is not} for `pysafegeom info`."""
    return {name: ("available" if load(name)[0] is not None else load(name)[1]) for name in BACKENDS}


def reset() -> None:
    """Forget cached availability (tests that change the environment use this)."""
    _cache.clear()
