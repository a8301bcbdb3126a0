"""The argparse types and option groups the commands share (:mod:`pysafegeom.cli`, :mod:`pysafegeom.cli_replay`,
:mod:`pysafegeom.cli_trajectory`): checked numbers, devices and dtypes, and the placement of a model over several
devices (``--device-map``, ``--max-memory``, ``--offload-folder``, ``--gcg-devices``)."""

from __future__ import annotations

import argparse
from dataclasses import replace

from .errors import InvalidArgument
from .scale import RayOptions, ray_options  # (scale imports Ray only when a fan-out runs)


def _arg(check, parse=int, **kw):
    """An argparse ``type=``: parse the text, then run a :mod:`pysafegeom.validate` check on it; a bad value
    becomes argparse's own one-line error naming the option. Returns the checked value."""
    from . import validate as V
    from .errors import PysafegeomError

    def convert(text):
        try:
            v = parse(text)
        except ValueError:
            what = "an integer" if parse is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        try:
            return getattr(V, check)("value", v, **kw)
        except PysafegeomError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix("value ")) from None

    convert.__name__ = check
    return convert


def _text_arg(check, **kw):
    """An argparse ``type=`` for a text option (``--device``, ``--dtype``, ``--save-at``): checked, passed on as text."""
    from . import validate as V
    from .errors import PysafegeomError

    def convert(text):
        try:
            out = getattr(V, check)("value", text, **kw)
        except PysafegeomError as exc:
            raise argparse.ArgumentTypeError(str(exc).replace("value=", "").removeprefix("value: ")) from None
        return ",".join(map(str, out)) if isinstance(out, tuple) else text

    convert.__name__ = check
    return convert


_POS = _arg("positive_int")
_NONNEG_FLOAT = _arg("finite_float", float, lo=0.0)
_LR = _arg("finite_float", float, lo=0.0, hi=1.0, lo_open=True)
_POS_FLOAT = _arg("finite_float", float, lo=0.0, lo_open=True)
_STEPS = _text_arg("int_list_option", lo=0)
_DEVICE, _DTYPE = _text_arg("device"), _text_arg("dtype")


def gcg_devices(text: str) -> tuple[str, ...]:
    """``--gcg-devices``: comma-separated devices, or ``all`` (every visible GPU)."""
    if text.strip() == "all":
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise argparse.ArgumentTypeError("--gcg-devices all: torch sees no GPU; name the devices (e.g. cpu,cpu)")
        return tuple(f"cuda:{i}" for i in range(n))
    from .attacks import multidevice
    from .errors import PysafegeomError

    try:
        return multidevice.parse_devices(tuple(d.strip() for d in text.split(",") if d.strip()))
    except PysafegeomError as exc:
        raise argparse.ArgumentTypeError(f"--gcg-devices {text!r}: {exc}") from None


def _device_map(text: str):
    """``--device-map``: a mode (auto, balanced, ...), a JSON object {module: device} or a JSON file holding one."""
    import json
    from pathlib import Path

    t = text.strip()
    if t.startswith("{") or t.endswith(".json"):
        try:
            d = json.loads(Path(t).read_text(encoding="utf-8") if not t.startswith("{") else t)
        except (OSError, ValueError) as exc:
            raise argparse.ArgumentTypeError(f"--device-map {text!r}: not a JSON object or a readable JSON file ({exc})") \
                from None
        if not isinstance(d, dict):
            raise argparse.ArgumentTypeError(f"--device-map {text!r}: the JSON must be an object {{module: device}}")
        return d
    from .validate import DEVICE_MAP_MODES

    if t not in DEVICE_MAP_MODES:
        raise argparse.ArgumentTypeError(f"--device-map {text!r}: give one of {', '.join(DEVICE_MAP_MODES)}, a JSON object "
                                         "{module: device} or a .json file holding one")
    return t


def _max_memory(text: str) -> dict:
    """``--max-memory 0=20GiB,1=20GiB,cpu=64GiB``: device -> limit (a GPU index or a device name)."""
    out = {}
    for item in (s.strip() for s in text.split(",") if s.strip()):
        dev, sep, size = item.partition("=")
        if not sep or not dev.strip() or not size.strip():
            raise argparse.ArgumentTypeError(f"--max-memory takes DEVICE=SIZE pairs (e.g. 0=20GiB,cpu=64GiB), got {item!r}")
        dev = dev.strip()
        out[int(dev) if dev.isdigit() else dev] = size.strip()
    if not out:
        raise argparse.ArgumentTypeError("--max-memory is empty; give DEVICE=SIZE pairs such as 0=20GiB,cpu=64GiB")
    return out


def add_placement_args(p) -> None:
    """``--device-map``, ``--max-memory`` and ``--offload-folder``: a model placed over several devices."""
    g = p.add_argument_group("placing a large model over several devices (accelerate)")
    g.add_argument("--device-map", type=_device_map, default=None, metavar="MAP",
                   help="auto, balanced, balanced_low_0, sequential, a JSON object {module: device} or a JSON file "
                        "(instead of --device)")
    g.add_argument("--max-memory", type=_max_memory, default=None, metavar="DEV=SIZE,...",
                   help="with --device-map: memory per device, e.g. 0=20GiB,1=20GiB,cpu=64GiB")
    g.add_argument("--offload-folder", default=None, metavar="DIR",
                   help="with --device-map: where weights placed on 'disk' are kept")


def placement_from_args(args) -> dict:
    """The ``device_map`` / ``max_memory`` / ``offload_folder`` keywords the flags set (empty without them)."""
    return {k: v for k, v in (("device_map", getattr(args, "device_map", None)),
                              ("max_memory", getattr(args, "max_memory", None)),
                              ("offload_folder", getattr(args, "offload_folder", None))) if v is not None}


def add_ray_args(p) -> None:
    """``--ray [ADDRESS]``, ``--ray-gpus``, ``--ray-cpus``, ``--ray-workers`` and ``--ray-chunk`` on a parser."""
    g = p.add_argument_group("Ray fan-out (pip install 'pysafegeom[ray]')")
    g.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="fan the work out on Ray: a local cluster (no ADDRESS) or an existing one ('auto', HOST:PORT, "
                        "ray://HOST:PORT); the outputs are those of a single-process run")
    g.add_argument("--ray-gpus", type=_NONNEG_FLOAT, default=None, metavar="N", help="GPUs per Ray task (default 0; e.g. 1)")
    g.add_argument("--ray-cpus", type=_NONNEG_FLOAT, default=None, metavar="N", help="CPUs per Ray task (default 1)")
    g.add_argument("--ray-workers", type=_POS, default=None, metavar="N",
                   help="CPUs of a local cluster started here (default: every CPU)")
    g.add_argument("--ray-chunk", type=_POS, default=None, metavar="N",
                   help="behaviours per adaptive-attack task (default 4; a model load per task)")


def ray_from_args(args) -> RayOptions | None:
    """The :class:`RayOptions` of ``--ray`` and its resource flags (None without ``--ray``)."""
    extra = {k: v for k, v in (("num_gpus", getattr(args, "ray_gpus", None)), ("num_cpus", getattr(args, "ray_cpus", None)),
                               ("workers", getattr(args, "ray_workers", None)),
                               ("chunk", getattr(args, "ray_chunk", None))) if v is not None}
    if getattr(args, "ray", None) is None:
        if extra:
            raise InvalidArgument("--ray-gpus / --ray-cpus / --ray-workers / --ray-chunk set up Ray tasks: give --ray too")
        return None
    opts = ray_options(args.ray)
    return replace(opts, **extra).check()


__all__ = ["add_placement_args", "add_ray_args", "gcg_devices", "placement_from_args", "ray_from_args"]
