"""Fan-out on Ray: one Ray task per unit of work (an anchor, an (attacked model, behaviour chunk) pair, a replay
shard), results in the same folders as a single-process run.

Ray is an optional extra (``pip install pysafegeom[ray]``) and is imported only here, only when a caller passes
``ray=``: without it every pipeline stays in one process. ``ray=True`` (or ``"local"``) starts a local cluster (or
uses the one this process already joined with ``ray.init``); ``ray="HOST:PORT"`` / ``"auto"`` joins an existing
cluster; a :class:`RayOptions` or a dict sets the resources of each task as well.

Each unit writes its own outputs atomically into the shared output folder (the cluster's workers must see it: a
local cluster, or a shared filesystem) and a rerun skips finished units, so a killed driver or worker loses at most
the units in flight. A worker process that dies mid-task is retried by Ray (``max_retries``); an exception raised by
the work itself is not retried (it would fail again) and is re-raised in the driver, naming the unit. Progress is one
bar over all units.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from .errors import InvalidArgument, InvalidType

INSTALL_HINT = "pip install 'pysafegeom[ray]'"
LOCAL = ("local", "true", "")


class UnitFailed(RuntimeError):
    """A unit of fanned-out work raised; ``unit`` names it and ``__cause__`` is the worker's exception."""

    def __init__(self, message: str, unit: str):
        super().__init__(message)
        self.unit = unit


@dataclass(frozen=True)
class RayOptions:
    """How work is fanned out on Ray.

    ``address``: None for a local cluster (or the cluster this process joined already), ``"auto"`` or
    ``"HOST:PORT"`` / ``"ray://HOST:PORT"`` for an existing one. ``num_cpus`` / ``num_gpus``: the resources each task
    asks for (a task runs torch with ``num_cpus`` threads); ``workers``: the CPUs of a local cluster started here
    (default: every CPU). ``max_retries``: how often a task whose worker process died is run again.
    ``runtime_env``: passed to ``ray.init`` (e.g. ``{"working_dir": ...}`` for a remote cluster). ``chunk``: the
    behaviours of one attack task (adaptive attacks; a model load per task, so 5-10 for a 7B model).
    """

    address: str | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    workers: int | None = None
    max_retries: int = 3
    chunk: int = 4
    runtime_env: dict | None = field(default=None, compare=False)

    def check(self) -> "RayOptions":
        if self.address is not None and not isinstance(self.address, str):
            raise InvalidType(f"ray address must be a string such as 'auto' or 'HOST:PORT', got {type(self.address).__name__}")
        for name in ("num_cpus", "num_gpus"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or v != v:
                raise InvalidArgument(f"ray {name} must be a number >= 0, got {v!r}")
        if self.num_cpus == 0 and self.num_gpus == 0:
            raise InvalidArgument("a ray task must ask for some resource: num_cpus > 0 or num_gpus > 0")
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int)
                                         or self.workers < 1):
            raise InvalidArgument(f"ray workers must be an integer >= 1, got {self.workers!r}")
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise InvalidArgument(f"ray max_retries must be an integer >= 0, got {self.max_retries!r}")
        if isinstance(self.chunk, bool) or not isinstance(self.chunk, int) or self.chunk < 1:
            raise InvalidArgument(f"ray chunk (behaviours per attack task) must be an integer >= 1, got {self.chunk!r}")
        return self


def ray_options(ray) -> RayOptions | None:
    """``ray=`` of the pipelines as :class:`RayOptions`: None/False (single process), True or ``"local"`` (a local
    cluster), an address string, a dict of :class:`RayOptions` fields, or a :class:`RayOptions`."""
    if ray is None or ray is False:
        return None
    if ray is True:
        return RayOptions().check()
    if isinstance(ray, RayOptions):
        return ray.check()
    if isinstance(ray, str):
        return RayOptions(address=None if ray.strip().lower() in LOCAL else ray.strip()).check()
    if isinstance(ray, dict):
        unknown = sorted(set(ray) - set(RayOptions.__dataclass_fields__))
        if unknown:
            raise InvalidArgument(f"unknown ray option(s) {', '.join(unknown)}; known: "
                                  f"{', '.join(RayOptions.__dataclass_fields__)}")
        return RayOptions(**ray).check()
    raise InvalidType(f"ray must be None, True, an address string, a dict or a RayOptions, got {type(ray).__name__}")


def import_ray():
    try:
        import ray
    except ImportError:
        raise ImportError(f"--ray / ray= fans the work out on Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


class session:
    """``with session(opts):`` joins (or starts) a cluster and leaves it afterwards if it was started here; the
    :func:`run_units` calls inside share it (a local cluster starts once for several pools of units)."""

    def __init__(self, opts: RayOptions):
        self.opts = opts
        self.started = False

    def __enter__(self):
        ray = import_ray()
        if not ray.is_initialized():
            kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
            if self.opts.runtime_env:
                kw["runtime_env"] = self.opts.runtime_env
            if self.opts.address is None:
                kw["num_cpus"] = self.opts.workers or os.cpu_count() or 1
            else:
                kw["address"] = self.opts.address
            ray.init(**kw)
            self.started = True
        return ray

    def __exit__(self, *exc):
        if self.started:
            import ray

            ray.shutdown()
        return False


def _run_unit(fn: Callable, threads: int, kwargs: dict):
    """What each Ray task runs: ``fn(**kwargs)`` with torch limited to the task's CPUs."""
    try:
        import torch

        torch.set_num_threads(max(1, threads))
    except ImportError:  # pragma: no cover
        pass
    t0 = time.perf_counter()
    out = fn(**kwargs)
    return {"result": out, "seconds": time.perf_counter() - t0, "pid": os.getpid()}


def per_process_offload(placement: dict | None) -> dict:
    """``placement`` (load_model's device_map / max_memory / offload_folder) with the offload folder made this
    process's own subfolder, so tasks of one node that offload the same model to disk never write one folder at once."""
    placement = dict(placement or {})
    if placement.get("offload_folder") is not None:
        from pathlib import Path

        placement["offload_folder"] = str(Path(placement["offload_folder"]) / f"worker-{os.getpid()}")
    return placement


def _cause(exc: BaseException) -> BaseException:
    return getattr(exc, "cause", None) or exc


def progress_bar(total: int, desc: str, progress: bool = True):
    """One bar for several :func:`run_units` pools of one command (pass it as their ``bar``)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"{desc} on ray", unit="unit", disable=not progress)


def run_units(units: Iterable[tuple[str, dict]], fn: Callable, opts: RayOptions, *, desc: str = "units",
              progress: bool = True, on_done: Callable[[str, Any], None] | None = None, bar=None) -> dict[str, dict]:
    """Run ``fn(**kwargs)`` for every ``(key, kwargs)`` unit as one Ray task; returns ``{key: {"result", "seconds",
    "pid"}}``. ``fn`` must be importable by the workers (a module-level function). ``on_done(key, result)`` runs in
    the driver as each unit finishes (to persist it at once). The first unit that raises cancels the units not yet
    finished and is re-raised as :class:`UnitFailed` (its exception as the cause). ``bar``: a
    :func:`progress_bar` shared with other pools (left open), else one of this pool's own."""
    units = list(units)
    keys = [k for k, _ in units]
    if len(set(keys)) != len(keys):
        raise InvalidArgument("two units of work have the same key")
    if not units:
        return {}
    with session(opts) as ray:
        remote = ray.remote(_run_unit).options(num_cpus=opts.num_cpus, num_gpus=opts.num_gpus,
                                               max_retries=opts.max_retries, retry_exceptions=False,
                                               name=f"pysafegeom:{desc}")
        threads = max(1, int(opts.num_cpus))
        refs = {remote.remote(fn, threads, kw): key for key, kw in units}
        own = bar is None
        bar = progress_bar(len(units), desc, progress) if own else bar
        done: dict[str, dict] = {}
        pending = list(refs)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                for ref in ready:
                    key = refs[ref]
                    try:
                        out = ray.get(ref)
                    except Exception as exc:  # the work raised (a dead worker is retried by Ray first)
                        cause = _cause(exc)
                        raise UnitFailed(f"{desc}: unit {key} failed: {type(cause).__name__}: {cause}", key) from cause
                    done[key] = out
                    if on_done is not None:
                        on_done(key, out["result"])
                    bar.update(1)
                    bar.set_postfix(in_flight=len(pending))
        finally:
            for ref in pending:
                ray.cancel(ref)
            if own:
                bar.close()
    return done


__all__ = ["INSTALL_HINT", "RayOptions", "UnitFailed", "import_ray", "per_process_offload", "progress_bar", "ray_options",
           "run_units", "session"]
