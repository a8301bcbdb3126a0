"""`pysafegeom info`: versions, op backends (and why any is unavailable), the model cache."""

from __future__ import annotations

import importlib.metadata as md
import platform


def _version(pkg: str) -> str:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return "not installed"


def collect() -> dict:
    import torch

    from .models import REGISTRY, cache_dir, cached_models
    from .ops import backend_report
    from .ops import _backends

    cuda = torch.cuda.is_available()
    info = {
        "versions": {
            "python": platform.python_version(),
            "pysafegeom": _version("pysafegeom"),
            "torch": torch.__version__,
            "transformers": _version("transformers"),
            "triton": _version("triton"),
            "accelerate": _version("accelerate"),  # --device-map (a model placed over several devices)
            "ray": _version("ray") + ("" if _version("ray") != "not installed" else " (--ray: pip install 'pysafegeom[ray]')"),
        },
        "device": {
            "cuda_available": cuda,
            "torch_cuda_build": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if cuda else None,
            "cpu_threads": torch.get_num_threads(),
        },
        "backends": backend_report(),
        "extension": _extension_info(),
        "forced_backend": _backends.forced(),
        "model_cache": {"path": str(cache_dir()), "models": cached_models()},
        "registered_models": {k: v.description for k, v in REGISTRY.items()},
    }
    try:
        from .attacks.gcg import hot_path

        info["gcg_hot_path"] = {d: hot_path(d) for d in (["cpu", "cuda"] if cuda else ["cpu"])}
    except Exception as exc:  # never let info fail
        info["gcg_hot_path"] = {"error": f"{type(exc).__name__}: {exc}"}
    return info


def _extension_info() -> str:
    try:
        from .ops import _ext

        ok, why = _ext.load()
        return _ext.build_info() if ok else why
    except Exception as exc:  # _ext missing or broken: say so
        return f"not available ({type(exc).__name__}: {exc})"


def render(info: dict) -> str:
    lines = ["pysafegeom environment", ""]
    lines += [f"  {k:<13} {v}" for k, v in info["versions"].items()]
    dev = info["device"]
    gpu = dev["gpu"] or "none"
    lines += ["", f"  device        CUDA {'available' if dev['cuda_available'] else 'not available'}"
                  f" (torch CUDA build: {dev['torch_cuda_build'] or 'no, CPU build'}); GPU: {gpu}; CPU threads: {dev['cpu_threads']}"]
    lines += ["", f"  extension     {info['extension']}", "", "  op backends" + (
        f" (forced by PYSAFEGEOM_BACKEND={info['forced_backend']})" if info["forced_backend"] else " (automatic choice)")]
    for name, status in info["backends"].items():
        mark = "yes" if status == "available" else "no "
        lines.append(f"    {name:<8} {mark}  {'' if status == 'available' else status}".rstrip())
    for dev, ops_used in (info.get("gcg_hot_path") or {}).items():
        if isinstance(ops_used, dict):
            lines += ["", f"  GCG hot path on {dev}"]
            lines += [f"    {k}: {v}" for k, v in ops_used.items()]
    mc = info["model_cache"]
    lines += ["", f"  model cache   {mc['path']}"]
    if mc["models"]:
        for m in mc["models"]:
            lines.append(f"    {m['name']}  ({m['size_mb']} MB{', from ' + m['source'] if 'source' in m else ''})")
    else:
        lines.append("    (empty: models are cached on first load)")
    lines += ["", "  registered models"]
    lines += [f"    {k}: {v}" for k, v in info["registered_models"].items()]
    return "\n".join(lines)
