"""Argument checks shared by the public API and the command line: one place for "what is accepted".

Every check takes the argument's ``name`` and its value, returns the value in its normal form (an int,
a float, a list of strings, a ``torch.device``...) and otherwise raises a :mod:`pysafegeom.errors`
type whose message names the argument, shows what was given and says what is accepted, e.g.
``n_val must be an integer >= 1, got -3``. Wrong types raise :class:`~pysafegeom.errors.InvalidType`
(a ``TypeError``), wrong values :class:`~pysafegeom.errors.InvalidArgument` (a ``ValueError``), bad
files :class:`~pysafegeom.errors.InputFileError` / :class:`~pysafegeom.errors.MissingFile`.

This module imports only torch (transformers lazily), so every layer can use it.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import numbers
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from .errors import DataOverlap, InputFileError, InvalidArgument, InvalidType, MissingFile

# Characters that render as nothing: a prompt made only of these (and whitespace) is empty.
INVISIBLE = "\u200b\u200c\u200d\u200e\u200f\u2060\u2061\u2062\u2063\u2064\ufeff\u00ad\u180e\u034f"
_INVISIBLE_TABLE = str.maketrans("", "", INVISIBLE)


def show(v: Any, limit: int = 60) -> str:
    """A short repr of ``v`` for an error message."""
    r = repr(v)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _kind(v: Any) -> str:
    return type(v).__name__


def _a(v: Any) -> str:
    """'an int', 'a str': the type of ``v`` with its article."""
    k = _kind(v)
    return ("an " if k[:1].lower() in "aeiou" else "a ") + k


# --- numbers --------------------------------------------------------------------------------------

def integer(name: str, v: Any, *, lo: int | None = None, hi: int | None = None, hint: str = "") -> int:
    """``v`` as an int in ``[lo, hi]``; bools, floats (even ``8.0``) and strings are refused."""
    rng = _range_text(lo, hi)
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        what = f"an integer{' ' + rng if rng else ''}"
        raise InvalidType(f"{name} must be {what}, got {_kind(v)} {show(v)}" + _tail(hint))
    iv = int(v)
    if (lo is not None and iv < lo) or (hi is not None and iv > hi):
        raise InvalidArgument(f"{name} must be {rng}, got {iv}" + _tail(hint))
    return iv


def _range_text(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f"in [{lo}, {hi}]"
    if lo is not None:
        return f">= {lo}"
    if hi is not None:
        return f"<= {hi}"
    return ""


def _tail(hint: str) -> str:
    return f": {hint}" if hint else ""


def positive_int(name: str, v: Any, hint: str = "") -> int:
    """An int >= 1 (``n_val``, ``batch_size``, ``max_new_tokens``...)."""
    return integer(name, v, lo=1, hint=hint)


def nonneg_int(name: str, v: Any, hint: str = "") -> int:
    """An int >= 0 (``min_comply_words``, ``warmup_steps``, ``seed``...)."""
    return integer(name, v, lo=0, hint=hint)


def optional_positive_int(name: str, v: Any, hint: str = "") -> int | None:
    """None, or an int >= 1."""
    return None if v is None else integer(name, v, lo=1, hint=hint + (" (or None)" if not hint else ""))


def finite_float(name: str, v: Any, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
                 hi_open: bool = False, hint: str = "") -> float:
    """``v`` as a finite float in the interval ``lo..hi`` (bounds closed unless ``lo_open``/``hi_open``)."""
    left = None if lo is None else ("(" if lo_open else "[") + f"{lo:g}"
    right = None if hi is None else f"{hi:g}" + (")" if hi_open else "]")
    if left and right:
        accepted = f"a finite number in {left}, {right}"
    elif left:
        accepted = f"a finite number {'>' if lo_open else '>='} {lo:g}"
    elif right:
        accepted = f"a finite number {'<' if hi_open else '<='} {hi:g}"
    else:
        accepted = "a finite number"
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        if isinstance(v, torch.Tensor) and v.numel() == 1 and v.is_floating_point():
            v = float(v)
        else:
            raise InvalidType(f"{name} must be {accepted}, got {_kind(v)} {show(v)}" + _tail(hint))
    f = float(v)
    bad = not math.isfinite(f)
    if not bad and lo is not None:
        bad = f <= lo if lo_open else f < lo
    if not bad and hi is not None:
        bad = f >= hi if hi_open else f > hi
    if bad:
        raise InvalidArgument(f"{name} must be {accepted}, got {f!r}" + _tail(hint))
    return f


def boolean(name: str, v: Any) -> bool:
    """A real bool (``"False"`` is a non-empty string, hence true: refused rather than misread)."""
    if isinstance(v, bool):
        return v
    if isinstance(v, (numbers.Integral,)) and v in (0, 1):
        return bool(v)
    raise InvalidType(f"{name} must be True or False, got {_kind(v)} {show(v)}")


def finite_tensor(name: str, t: Any, *, shape: tuple | None = None) -> torch.Tensor:
    """A floating-point tensor without NaN or infinities (and of ``shape`` when given, -1 = any)."""
    if not isinstance(t, torch.Tensor):
        raise InvalidType(f"{name} must be a torch.Tensor, got {_kind(t)}")
    if not t.is_floating_point():
        raise InvalidType(f"{name} must be a floating-point tensor, got {t.dtype}")
    if shape is not None and (t.dim() != len(shape) or any(s not in (-1, n) for s, n in zip(shape, t.shape))):
        want = "[" + ", ".join("*" if s == -1 else str(s) for s in shape) + "]"
        raise InvalidArgument(f"{name} must have shape {want}, got {list(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        n_bad = int((~torch.isfinite(t)).sum())
        raise InvalidArgument(f"{name} contains {n_bad} NaN or infinite value(s); every entry must be finite")
    return t


# --- strings and lists ----------------------------------------------------------------------------

def is_blank(s: str) -> bool:
    """True for a string that shows nothing: empty, whitespace, or only zero-width characters."""
    return not s.translate(_INVISIBLE_TABLE).strip()


def str_list(name: str, v: Any, *, allow_empty: bool = False, nonblank: bool = True) -> list[str]:
    """A list of strings. A single string is one item (never split into characters); a non-string item is
    refused naming its index; empty or blank items are refused when ``nonblank``."""
    if isinstance(v, str):
        v = [v]
    elif v is None or isinstance(v, (bytes, dict)) or not isinstance(v, Iterable):
        raise InvalidType(f"{name} must be a string or a list of strings, got {_kind(v)} {show(v)}")
    out = list(v)
    for i, s in enumerate(out):
        if not isinstance(s, str):
            raise InvalidType(f"{name}[{i}] is {_a(s)} ({show(s)}), not a string; {name} must hold strings only")
        if nonblank and is_blank(s):
            raise InvalidArgument(f"{name}[{i}] is empty or only whitespace/zero-width characters ({show(s)}); "
                                  "every item needs visible text")
    if not out and not allow_empty:
        raise InvalidArgument(f"{name} is empty; give at least one string")
    return out


def prompt_list(name: str, v: Any, *, item: str = "prompt") -> list[str]:
    """A non-empty list of prompts with visible text. One string is refused (a list is expected: a
    string would otherwise be read as its characters); so are empty, whitespace-only and zero-width-only
    prompts such as ``"\\u200b\\u200b"``."""
    if isinstance(v, str):
        raise InvalidType(f"{name} must be a list of strings, not one string ({show(v)}); wrap it: [{show(v)}]")
    if v is None or isinstance(v, (bytes, dict)) or not isinstance(v, Iterable):
        raise InvalidType(f"{name} must be a list of strings, got {_kind(v)} {show(v)}")
    out = list(v)
    if not out:
        raise InvalidArgument(f"{name}: the list is empty; give at least one {item}")
    for i, s in enumerate(out):
        if not isinstance(s, str):
            raise InvalidType(f"{name}: {item} {i} is {_a(s)} ({show(s)}), not a string")
        if is_blank(s):
            raise InvalidArgument(f"{name}: {item} {i} is empty or only whitespace (or zero-width characters): "
                                  f"{show(s)}; every {item} needs visible text")
    return out


def choice(name: str, v: Any, options: Sequence[str]) -> str:
    """One of ``options`` (with a did-you-mean for near misses)."""
    opts = list(options)
    if isinstance(v, str) and v in opts:
        return v
    listed = ", ".join(map(repr, opts))
    if not isinstance(v, str):
        raise InvalidType(f"{name} must be one of {listed}, got {_kind(v)} {show(v)}")
    near = difflib.get_close_matches(v, opts, n=1, cutoff=0.6) or [o for o in opts if o.lower() == v.lower()]
    hint = f"; did you mean {near[0]!r}?" if near else ""
    raise InvalidArgument(f"{name} must be one of {listed}, got {v!r}{hint}")


def int_list_option(name: str, text: Any, *, lo: int | None = 1) -> tuple[int, ...]:
    """A comma-separated list of integers from the command line (``--save-at 10,20``); ``""`` is ``()``."""
    if text is None:
        return ()
    if not isinstance(text, str):
        return tuple(integer(f"{name}[{i}]", x, lo=lo) for i, x in enumerate(text))
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            x = int(part)
        except ValueError:
            raise InvalidArgument(f"{name}: {part!r} is not an integer; give comma-separated integers, "
                                  f"e.g. 10,20 (got {text!r})") from None
        if lo is not None and x < lo:
            raise InvalidArgument(f"{name}: {x} is less than {lo}; give comma-separated integers >= {lo} "
                                  f"(got {text!r})")
        out.append(x)
    return tuple(out)


# --- models, tokenizers, devices, dtypes ----------------------------------------------------------

def looks_like_tokenizer(v: Any) -> bool:
    try:
        from transformers import PreTrainedTokenizerBase

        if isinstance(v, PreTrainedTokenizerBase):
            return True
    except ImportError:  # pragma: no cover
        pass
    return (not isinstance(v, torch.nn.Module) and callable(v) and hasattr(v, "decode")
            and (hasattr(v, "apply_chat_template") or hasattr(v, "convert_tokens_to_ids")))


def is_model(name: str, v: Any) -> Any:
    """A loaded model (a ``torch.nn.Module``); a tokenizer, a path or a ``(model, tokenizer)`` pair is refused
    with a message that says which of those it is."""
    if isinstance(v, torch.nn.Module):
        return v
    if looks_like_tokenizer(v):
        raise InvalidType(f"{name} is a tokenizer ({_kind(v)}), not a model: the model and tokenizer arguments look "
                          "swapped; pass the model first, then its tokenizer")
    if isinstance(v, (str, os.PathLike)):
        raise InvalidType(f"{name} must be a loaded model (a torch.nn.Module), got the path {show(str(v))}; load it "
                          f"first: model, tokenizer = pysafegeom.load_model({show(str(v))})")
    if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], torch.nn.Module):
        raise InvalidType(f"{name} is a (model, tokenizer) pair; unpack what load_model returns: "
                          "model, tokenizer = pysafegeom.load_model(...)")
    raise InvalidType(f"{name} must be a loaded model (a torch.nn.Module), got {_kind(v)} {show(v)}")


def is_tokenizer(name: str, v: Any) -> Any:
    """A tokenizer (callable, with ``decode``); a model in its place is refused as swapped arguments."""
    if looks_like_tokenizer(v):
        return v
    if isinstance(v, torch.nn.Module):
        raise InvalidType(f"{name} is a model ({_kind(v)}), not a tokenizer: the model and tokenizer arguments look "
                          "swapped; pass the model first, then its tokenizer")
    if v is None:
        raise InvalidType(f"{name} is None; pass the tokenizer that pysafegeom.load_model returned with the model")
    if isinstance(v, (str, os.PathLike)):
        raise InvalidType(f"{name} must be a loaded tokenizer, got the path {show(str(v))}; load it first: "
                          f"model, tokenizer = pysafegeom.load_model({show(str(v))})")
    raise InvalidType(f"{name} must be a tokenizer (e.g. what pysafegeom.load_model returns), got {_kind(v)} {show(v)}")


_DEVICE_ALIASES = {"gpu": "cuda", "nvidia": "cuda", "cuda0": "cuda:0", "gpu0": "cuda:0", "gpu:0": "cuda:0",
                   "metal": "mps", "apple": "mps", "cpu0": "cpu", "cpu:0": "cpu"}
DEVICE_TYPES = ("cpu", "cuda", "mps")


def device(name: str, v: Any, *, check_available: bool = True) -> torch.device | None:
    """None, or a ``torch.device`` of type cpu, cuda[:N] or mps that exists here (``"gpu"`` -> did you mean 'cuda'?)."""
    if v is None:
        return None
    accepted = "'cpu', 'cuda', 'cuda:N' or 'mps'"
    if isinstance(v, torch.device):
        dev = v
    elif isinstance(v, str):
        s = v.strip().lower()
        if s in _DEVICE_ALIASES and _DEVICE_ALIASES[s] != s:
            raise InvalidArgument(f"{name}={v!r} is not a device name; did you mean {_DEVICE_ALIASES[s]!r}? "
                                  f"Accepted: {accepted}")
        try:
            dev = torch.device(s)
        except (RuntimeError, ValueError):
            raise InvalidArgument(f"{name}={v!r} is not a device; accepted: {accepted}") from None
    elif isinstance(v, numbers.Integral) and not isinstance(v, bool):
        raise InvalidType(f"{name}={v!r}: give a device name, e.g. 'cuda:{v}' or 'cpu'")
    else:
        raise InvalidType(f"{name} must be a device name ({accepted}) or a torch.device, got {_kind(v)} {show(v)}")
    if dev.type not in DEVICE_TYPES:
        raise InvalidArgument(f"{name}={v!r}: device type {dev.type!r} is not supported; accepted: {accepted}")
    if check_available:
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise InvalidArgument(f"{name}={v!r} but CUDA is not available here (torch {torch.__version__}); "
                                      "use device='cpu'")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise InvalidArgument(f"{name}={v!r} but this machine has {torch.cuda.device_count()} CUDA device(s) "
                                      f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
        if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise InvalidArgument(f"{name}={v!r} but Apple's MPS backend is not available here; use device='cpu'")
    return dev


DEVICE_MAP_MODES = ("auto", "balanced", "balanced_low_0", "sequential")


def _map_device(name: str, key, v, *, check_available: bool) -> str | int:
    """One device of a device map: an int GPU index, 'cpu', 'disk', 'cuda[:N]', 'mps' or a torch.device, normalised
    to what accelerate takes (an int for a CUDA device, else the name)."""
    where = f"{name}[{key!r}]"
    if isinstance(v, str) and v.strip().lower() == "disk":
        return "disk"
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        if v < 0:
            raise InvalidArgument(f"{where} = {v}: a GPU index must be >= 0")
        dev = device(where, f"cuda:{int(v)}", check_available=check_available)
    elif isinstance(v, (str, torch.device)):
        if isinstance(v, str) and v.strip().lower() == "meta":
            raise InvalidArgument(f"{where} = 'meta' is not a place to keep weights; use 'disk' (with offload_folder=) "
                                  "to offload them")
        try:
            dev = device(where, v, check_available=check_available)
        except InvalidArgument as exc:
            raise InvalidArgument(f"{exc}; a device map also accepts 'disk' and GPU indices (0, 1, ...)") from None
    else:
        raise InvalidType(f"{where} must be a device ('cpu', 'cuda:N', 'mps', 'disk', a GPU index or a torch.device), "
                          f"got {_kind(v)} {show(v)}")
    if dev.type == "cuda":
        return dev.index if dev.index is not None else 0
    return dev.type


def device_map(name: str, v: Any, *, check_available: bool = True) -> str | dict | None:
    """None, one of ``'auto'``, ``'balanced'``, ``'balanced_low_0'``, ``'sequential'`` (accelerate places the
    modules), or a dict module name -> device (an int GPU index, ``'cpu'``, ``'cuda:N'``, ``'mps'``, ``'disk'``);
    ``''`` as a key names the whole model. Devices are normalised to accelerate's form (ints for CUDA)."""
    if v is None:
        return None
    modes = ", ".join(map(repr, DEVICE_MAP_MODES))
    if isinstance(v, str):
        s = v.strip().lower()
        if s in DEVICE_MAP_MODES:
            return s
        near = difflib.get_close_matches(s, list(DEVICE_MAP_MODES), n=1, cutoff=0.6)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise InvalidArgument(f"{name}={v!r} is not a placement mode{hint}; pass one of {modes}, or a dict module name "
                              "-> device such as {'model.embed_tokens': 0, 'model.layers.0': 0, ..., 'lm_head': 'cpu'}; "
                              "for one device pass device= instead")
    if not isinstance(v, dict):
        raise InvalidType(f"{name} must be one of {modes} or a dict module name -> device, got {_kind(v)} {show(v)}")
    if not v:
        raise InvalidArgument(f"{name} is an empty dict: it places no module; pass {modes} or name every module")
    out = {}
    for key, dev in v.items():
        if not isinstance(key, str):
            raise InvalidType(f"{name} keys must be module names (str, '' for the whole model), got {_kind(key)} "
                              f"{show(key)}")
        out[key.strip()] = _map_device(name, key, dev, check_available=check_available)
    return out


def max_memory(name: str, v: Any, *, check_available: bool = True) -> dict | None:
    """None, or a dict device -> memory budget (bytes as an int, or a size such as ``'10GiB'`` / ``'500MB'``) for
    accelerate's placement; devices are GPU indices, ``'cpu'``, ``'cuda:N'``, ``'mps'`` or ``'disk'``."""
    if v is None:
        return None
    if not isinstance(v, dict) or not v:
        raise InvalidType(f"{name} must be a non-empty dict device -> memory (e.g. {{0: '20GiB', 'cpu': '60GiB'}}), "
                          f"got {_kind(v)} {show(v)}")
    out = {}
    for key, budget in v.items():
        dev = _map_device(name, key, key, check_available=check_available)
        if isinstance(budget, bool) or not isinstance(budget, (numbers.Integral, str)):
            raise InvalidType(f"{name}[{key!r}] must be a byte count (int) or a size such as '10GiB', got "
                              f"{_kind(budget)} {show(budget)}")
        if isinstance(budget, str):
            m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMG]i?B)\s*", budget, flags=re.IGNORECASE)
            if m is None:
                raise InvalidArgument(f"{name}[{key!r}] = {budget!r} is not a size; write e.g. '10GiB', '512MiB' or "
                                      "'2GB', or give bytes as an int")
            budget = budget.strip()
        elif budget <= 0:
            raise InvalidArgument(f"{name}[{key!r}] = {budget}: a memory budget must be > 0 bytes")
        out[dev] = budget
    return out


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "f32": torch.float32,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16, "f16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float64": torch.float64, "fp64": torch.float64, "double": torch.float64}


def dtype(name: str, v: Any) -> torch.dtype | None:
    """None, or a floating torch dtype from a ``torch.dtype`` or a name (float32/fp32, float16/fp16/half,
    bfloat16/bf16, float64; a ``torch.`` prefix is fine)."""
    if v is None or isinstance(v, torch.dtype) and v.is_floating_point:
        return v
    accepted = "float32, float16 or bfloat16 (or a floating torch.dtype)"
    if isinstance(v, torch.dtype):
        raise InvalidArgument(f"{name}={v} is not a floating-point dtype; use {accepted}")
    if not isinstance(v, str):
        raise InvalidType(f"{name} must be a dtype name or a torch.dtype ({accepted}), got {_kind(v)} {show(v)}")
    key = v.strip().lower().removeprefix("torch.")
    if key not in _DTYPES:
        near = difflib.get_close_matches(key, list(_DTYPES), n=1, cutoff=0.6)
        raise InvalidArgument(f"{name}: unknown dtype {v!r}; use {accepted}"
                              + (f" (did you mean {near[0]!r}?)" if near else ""))
    return _DTYPES[key]


def token_ids_fit(model, rows: Iterable[Sequence[int]], *, what: str = "the prompts",
                  extra: dict[str, int | None] | None = None) -> None:
    """Every token id in ``rows`` (and in ``extra``, e.g. ``{"the pad token": pad_id}``) is a row of the model's
    input embedding; otherwise the tokenizer does not belong to the model (a vocabulary mismatch), said plainly."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return
    V = int(weight.shape[0])
    hi, where = -1, ""
    for r in rows:
        if len(r):
            m = max(r)
            if m > hi:
                hi = int(m)
    for label, e in (extra or {}).items():
        if e is not None and int(e) > hi:
            hi, where = int(e), f" ({label})"
    if hi >= V:
        raise InvalidArgument(
            f"vocabulary mismatch: {what} contain token id {hi}{where}, but the model's embedding has only {V} rows "
            f"(ids 0..{V - 1}); the tokenizer does not belong to this model: pass the tokenizer saved with it "
            "(pysafegeom.load_model returns the pair)")


_check_dtype, _check_device = dtype, device  # check_analyze_config's parameters shadow these names


# --- data -----------------------------------------------------------------------------------------

_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"'})


def prompt_key(s: str) -> str:
    """The form two prompts are compared in everywhere (set overlap, split duplicates, a model's training
    record): NFKC, invisible characters dropped, straight quotes, collapsed whitespace, case-folded."""
    import unicodedata

    t = unicodedata.normalize("NFKC", s).translate(_INVISIBLE_TABLE).translate(_QUOTES)
    return " ".join(t.split()).casefold()


def overlap(prompts: Sequence[str], others: Sequence[str] | None) -> list[str]:
    """The prompts of ``prompts`` whose :func:`prompt_key` is among ``others``' (in order, each once)."""
    if not others:
        return []
    keys = {prompt_key(p) for p in others}
    return list(dict.fromkeys(p for p in prompts if prompt_key(p) in keys))


def disjoint(name_a: str, a: Sequence[str], name_b: str, b: Sequence[str]) -> None:
    """Raise :class:`DataOverlap` when two prompt sets share prompts (compared by :func:`prompt_key`)."""
    na = {prompt_key(s): s for s in a}
    nb = {prompt_key(s) for s in b}
    shared = [na[k] for k in na if k in nb]
    if not shared:
        return
    if set(na) == nb:
        raise DataOverlap(f"{name_a} and {name_b} are the same prompts ({len(nb)} distinct); give two different sets "
                          f"(e.g. harmful requests and matched harmless ones)")
    raise DataOverlap(f"{name_a} and {name_b} share {len(shared)} prompt(s), e.g. {show(shared[0])}; the sets must be "
                      "disjoint (remove the shared prompts from one of them)")


# --- files ----------------------------------------------------------------------------------------

def existing_file(name: str, path: Any, what: str = "a file") -> Path:
    """``path`` as a Path to an existing file (MissingFile naming it otherwise)."""
    if path is None or not isinstance(path, (str, os.PathLike)):
        raise InvalidType(f"{name} must be a path to {what}, got {_kind(path)} {show(path)}")
    p = Path(path)
    if not p.exists():
        raise MissingFile(f"{p} does not exist ({name}: expected {what})")
    if p.is_dir():
        raise InputFileError(f"{p} is a folder ({name}: expected {what})")
    return p


def json_file(path: str | os.PathLike, what: str = "a JSON file") -> Any:
    """The parsed contents of a JSON file; an empty, truncated or invalid file names the file and the problem."""
    p = Path(path)
    if not p.is_file():
        raise MissingFile(f"{p} does not exist (expected {what})")
    raw = p.read_bytes()
    if not raw.strip():
        raise InputFileError(f"{p} is empty (expected {what})")
    try:
        return json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise InputFileError(f"{p} is not UTF-8 text (byte {e.start}); expected {what}") from None
    except json.JSONDecodeError as e:
        cut = " (the file looks truncated)" if e.pos >= len(raw.rstrip()) - 1 else ""
        raise InputFileError(f"{p} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}{cut}; "
                             f"expected {what}") from None


def safetensors_file(path: str | os.PathLike) -> dict:
    """Check that a .safetensors file is whole (its header parses and the file holds every byte the header
    describes); returns the header. A truncated or corrupt file raises :class:`InputFileError` naming it."""
    p = Path(path)
    if not p.is_file():
        raise MissingFile(f"{p} does not exist (expected a .safetensors file)")
    size = p.stat().st_size
    fix = "re-save or re-copy it"
    if size < 8:
        raise InputFileError(f"{p} is truncated: {size} bytes, not even a safetensors header; {fix}")
    with open(p, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n <= 1 or 8 + n > size:
            raise InputFileError(f"{p} is truncated or not a safetensors file: its header claims {n} bytes but the "
                                 f"file has {size}; {fix}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise InputFileError(f"{p} is corrupt: its safetensors header is not valid JSON; {fix}") from None
    if not isinstance(header, dict):
        raise InputFileError(f"{p} is corrupt: its safetensors header is not a JSON object; {fix}")
    end = 0
    for k, t in header.items():
        if k == "__metadata__":
            continue
        try:
            end = max(end, int(t["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            raise InputFileError(f"{p} is corrupt: tensor {k!r} has no valid data_offsets in the header; "
                                 f"{fix}") from None
    if 8 + n + end > size:
        raise InputFileError(f"{p} is truncated: the header describes {8 + n + end} bytes but the file holds "
                             f"{size}; {fix}")
    return header


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32 (little-endian)"), (b"\x00\x00\xfe\xff", "UTF-32 (big-endian)"),
         (b"\xff\xfe", "UTF-16 (little-endian)"), (b"\xfe\xff", "UTF-16 (big-endian)"))


def utf8_text(path: str | os.PathLike) -> str:
    """A text file's contents, which must be UTF-8 (a UTF-8 BOM is fine). UTF-16/32 and Latin-1 files raise
    :class:`InputFileError` naming the file and the encoding it appears to have."""
    p = Path(path)
    raw = p.read_bytes()
    fix = "re-save it as UTF-8 (e.g. `iconv -f {enc} -t UTF-8 in > out`)"
    for bom, enc in _BOMS:
        if raw.startswith(bom):
            raise InputFileError(f"{p} is encoded as {enc}, not UTF-8; " + fix.format(enc=enc.split()[0]))
    if b"\x00" in raw[:4096]:
        odd = raw[1:4096:2].count(0) > raw[0:4096:2].count(0)
        enc = "UTF-16LE" if odd else "UTF-16BE"
        raise InputFileError(f"{p} contains NUL bytes: it looks like {enc} without a byte-order mark (or a binary "
                             "file), not UTF-8 text; " + fix.format(enc=enc))
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        guess = "Latin-1 / Windows-1252"
        raise InputFileError(f"{p} is not UTF-8: byte 0x{raw[e.start]:02x} at line {line} cannot be decoded (the file "
                             f"looks {guess} encoded); " + fix.format(enc="LATIN1")) from None


# --- the analysis facade --------------------------------------------------------------------------

_POSITION_NAME = re.compile(r"^eoi-[1-9][0-9]*$")


def check_analyze_config(cfg, *, model_loaded: bool, dtype, device) -> None:
    """Check an :class:`~pysafegeom.pipelines.analyze.AnalysisConfig` (after options were applied) and the
    ``dtype=``/``device=`` that :func:`pysafegeom.analyze` got; raise on the first problem, return nothing.

    ``model_loaded``: analyze() was given a model object (then ``dtype``/``device`` would be ignored and
    are an error). A single string for ``refusal_phrases`` or ``selection_positions`` is made a one-item
    list in place (never split into characters).
    """
    if not hasattr(cfg, "n_val"):
        raise InvalidType(f"config must be an AnalysisConfig, got {_kind(cfg)} {show(cfg)}")
    positive_int("n_val", cfg.n_val, hint="validation prompts per side for carrier selection")
    optional_positive_int("n_behaviour", getattr(cfg, "n_behaviour", None),
                          hint="a cap on each behavioural evaluation set, or None for the whole test split")
    optional_positive_int("batch_size", getattr(cfg, "batch_size", None),
                          hint="prompts per forward pass, or None to choose one that fits")
    positive_int("selection_layer_stride", cfg.selection_layer_stride, hint="1 searches every layer, 2 every other one")
    positive_int("k", getattr(cfg, "k", 3), hint="the size of the low-rank carriers")
    nonneg_int("min_filtered", getattr(cfg, "min_filtered", 16))
    kl = finite_float("kl_threshold", cfg.kl_threshold, lo=0.0, hint="the admissibility KL bound in nats (default 0.1)")
    if hasattr(cfg, "relaxed_kl_threshold"):
        finite_float("relaxed_kl_threshold", cfg.relaxed_kl_threshold, lo=kl,
                     hint=f"the fallback KL bound, at least kl_threshold={kl:g} (default 0.2)")
    for flag in ("interventions", "sweeps", "actadd", "orthogonal_controls"):
        if hasattr(cfg, flag):
            boolean(flag, getattr(cfg, flag))
    uses_controls = bool(getattr(cfg, "interventions", False) or getattr(cfg, "sweeps", False))
    if uses_controls:
        why = "interventions" if cfg.interventions else "sweeps"
        positive_int("n_controls", cfg.n_controls,
                     hint=f"{why}=True compares each carrier with matched random directions, so it needs at least one")
    else:
        nonneg_int("n_controls", cfg.n_controls)
    if getattr(cfg, "min_comply_words", None) is not None:
        nonneg_int("min_comply_words", cfg.min_comply_words,
                   hint="words of compliance after a refusal that make it partial")
    positive_int("max_new_tokens", cfg.max_new_tokens, hint="greedy tokens per judged answer")
    for opt in ("template", "system"):
        v = getattr(cfg, opt, None)
        if v is not None and not isinstance(v, str):
            raise InvalidType(f"{opt} must be a string or None, got {_kind(v)} {show(v)}")
    if getattr(cfg, "selection_positions", None) is not None:
        cfg.selection_positions = str_list("selection_positions", cfg.selection_positions)
        for i, p in enumerate(cfg.selection_positions):
            if not _POSITION_NAME.match(p):
                raise InvalidArgument(f"selection_positions[{i}] = {p!r} is not a post-instruction position; use "
                                      "names like 'eoi-1' (the last prompt token), 'eoi-2', ...")
    if getattr(cfg, "refusal_phrases", None) is not None:
        cfg.refusal_phrases = str_list("refusal_phrases", cfg.refusal_phrases)
    if getattr(cfg, "refusal_tokens", None) is not None:
        toks = cfg.refusal_tokens
        if isinstance(toks, (str, bytes)) or not isinstance(toks, Iterable):
            raise InvalidType(f"refusal_tokens must be a list of token ids, got {_kind(toks)} {show(toks)}")
        for i, t in enumerate(list(toks)):
            nonneg_int(f"refusal_tokens[{i}]", t)
    if model_loaded:
        given = [n for n, v in (("dtype", dtype), ("device", device)) if v is not None]
        if given:
            raise InvalidArgument(
                f"{' and '.join(given)}= apply only when analyze loads the model from a spec, but the model passed is "
                f"already loaded, so they would be ignored; move or cast it yourself (model.to(...)) and drop "
                f"{' and '.join(g + '=' for g in given)}")
    else:
        _check_dtype("dtype", dtype)
        _check_device("device", device)


__all__ = [
    "DEVICE_MAP_MODES", "INVISIBLE", "boolean", "check_analyze_config", "choice", "device", "device_map", "disjoint", "dtype", "existing_file",
    "finite_float", "finite_tensor", "int_list_option", "integer", "is_blank", "is_model", "is_tokenizer", "json_file",
    "max_memory", "nonneg_int", "optional_positive_int", "positive_int", "prompt_list", "safetensors_file", "sha256_file", "show",
    "str_list", "token_ids_fit", "utf8_text",
]
