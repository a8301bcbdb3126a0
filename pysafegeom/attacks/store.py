"""The test-case store: one folder format for the attacked prompts of every method.

A test case is the whole user message sent to a target model (the behaviour with a GCG suffix, an AutoDAN
rewrite, the behaviour alone, or the behaviour put into a jailbreak template). A store folder holds:

* ``records.jsonl``: one JSON object per test case, the source of truth. Required fields are
  :data:`REQUIRED_FIELDS`; every other field is kept as written (``suffix``, ``suffix_ids``,
  ``tokenizer_hash``, ``prompt``, ``category``, ``best_loss``, ``success``, ``judge``, ``completion``...).
* ``test_cases.json``: HarmBench's layout, ``{behavior_id: [test case, ...]}`` over all methods.
* ``logs.json``: HarmBench's GCG logs layout, ``{behavior_id: [{"final_loss", "all_losses", "all_test_cases"}]}``.
* ``store.json``: a manifest (format version, methods, source models, counts, and the sha256 of
  ``records.jsonl`` the other files were derived from).

Methods are named ``"gcg"``, ``"autodan"``, ``"direct"`` (the behaviour alone) and ``"template:<name>"``;
imports keep their own names (a JailbreakBench artifact's method, lower-cased) or ``"unknown"``.

A record is identified by ``(id, method, source_model_hash)`` plus ``case_index`` (default 0, for
imported sets holding several test cases per behaviour): :meth:`TestCaseStore.add` replaces a record with
the same key.

Crash safety: :meth:`TestCaseStore.add` rewrites each file through a temporary file and a rename, in the
order ``records.jsonl``, ``test_cases.json``, ``logs.json``, ``store.json``. A process killed in between
leaves ``records.jsonl`` complete (old or new batch, never half of one); the derived files are checked
against the digest in ``store.json`` on open and rebuilt from ``records.jsonl`` when they lag behind. The
API itself derives everything from ``records.jsonl``, so a reader through it never sees a mixed state.
Concurrent writers on one machine are serialised by a lock file (``.store.lock``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path

from .. import _io
from ..errors import InvalidArgument, MissingFile

FORMAT_VERSION = 1
REQUIRED_FIELDS = ("id", "behavior", "method", "source_model", "source_model_hash", "test_case", "target", "losses",
                   "config")
PLACEHOLDERS = ("{behavior}", "[REPLACE]")
NO_CASES = "expected records.jsonl, test_cases.json or a JailbreakBench artifact"


class StoreError(InvalidArgument):
    """A test-case store, record, template or imported file that cannot be used (a ``ValueError``)."""


class StoreMissing(StoreError, MissingFile):
    """A store path that does not exist (both a :class:`StoreError` and a ``FileNotFoundError``)."""


# ------------------------------------------------------------------------------------------ tokenizers

def tokenizer_hash(tokenizer) -> str:
    """A short fingerprint (16 hex digits of sha256) of a tokenizer: class name, the sorted ``get_vocab()``
    items, the added tokens and the special tokens. Equal for two loads of one tokenizer; different when the
    vocabulary differs, so token ids stored with one hash mean the same tokens only under that hash."""
    if not hasattr(tokenizer, "get_vocab"):
        raise StoreError(f"tokenizer_hash needs a Hugging Face tokenizer (with get_vocab()), got {type(tokenizer).__name__}")
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
    added = tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {}
    h.update(json.dumps(sorted(added.items()), ensure_ascii=False).encode())
    specials = getattr(tokenizer, "all_special_tokens", [])
    h.update(json.dumps(sorted(str(s) for s in specials), ensure_ascii=False).encode())
    return h.hexdigest()[:16]


def gcg_ids(record: Mapping, tokenizer) -> list[int]:
    """The GCG suffix token ids stored in ``record["suffix_ids"]``, checked to belong to ``tokenizer``.

    Raises :class:`StoreError` when the record has no ``suffix_ids``, or when its ``tokenizer_hash`` is missing
    or differs from :func:`tokenizer_hash` of ``tokenizer`` (the ids would then name other tokens).
    """
    rid = f"record {record.get('id')!r} ({record.get('method')}, from {record.get('source_model')})"
    ids = record.get("suffix_ids")
    if ids is None:
        raise StoreError(f"{rid} holds no suffix_ids (GCG token ids); replay its test_case text instead")
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise StoreError(f"{rid}: suffix_ids must be a list of non-negative ints")
    stored, mine = record.get("tokenizer_hash"), tokenizer_hash(tokenizer)
    if stored is None:
        raise StoreError(f"{rid} has suffix_ids but no tokenizer_hash, so it is unknown which tokens they name; "
                         f"replay its test_case text instead")
    if stored != mine:
        raise StoreError(f"{rid} was made with another tokenizer (tokenizer_hash {stored}, this one is {mine}), so its "
                         f"token ids mean other tokens here; replay the test_case text instead of the token ids")
    return list(ids)


# ------------------------------------------------------------------------------------------ records

def _where(i, rec) -> str:
    rid = rec.get("id") if isinstance(rec, Mapping) else None
    return f"record {i}" + (f" (id {rid!r})" if rid is not None else "")


def _nonempty_str(v) -> bool:
    return isinstance(v, str) and bool(v.strip())


def validate_record(rec: Mapping, i: int = 0, *, allow_unknown_behavior: bool = False) -> dict:
    """A checked copy of one record (``instruction`` taken as ``behavior`` when that is absent; integer losses
    made floats). Raises :class:`StoreError` naming the record and the field, and what to put there."""
    if not isinstance(rec, Mapping):
        raise StoreError(f"record {i} is a {type(rec).__name__}, not a dict (a JSON object)")
    r = dict(rec)
    if "behavior" not in r and "instruction" in r:
        r["behavior"] = r["instruction"]
    where = _where(i, r)
    missing = [f for f in REQUIRED_FIELDS if f not in r]
    if missing:
        raise StoreError(f"{where} lacks required field(s) {', '.join(missing)}; every record needs "
                         f"{', '.join(REQUIRED_FIELDS)}")
    for f in ("id", "method", "source_model", "source_model_hash"):
        if not _nonempty_str(r[f]):
            raise StoreError(f"{where}: {f} must be a non-empty string, got {r[f]!r}")
    if not _nonempty_str(r["test_case"]):
        raise StoreError(f"{where}: test_case must be a non-empty string (the whole attacked user message), got {r['test_case']!r}")
    if r["behavior"] is None:
        if not allow_unknown_behavior:
            raise StoreError(f"{where}: behavior is None; give the behaviour text (judges are shown it)")
    elif not _nonempty_str(r["behavior"]):
        raise StoreError(f"{where}: behavior must be a non-empty string, got {r['behavior']!r}")
    if r["target"] is not None and not isinstance(r["target"], str):
        raise StoreError(f"{where}: target must be a string or None, got {type(r['target']).__name__}")
    losses = r["losses"]
    if not isinstance(losses, (list, tuple)):
        raise StoreError(f"{where}: losses must be a list of floats (empty for a method without a loss), got "
                         f"{type(losses).__name__}")
    clean = []
    for j, v in enumerate(losses):
        if v is None:  # a non-finite loss, written as null by json_safe
            clean.append(None)
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise StoreError(f"{where}: losses[{j}] is {v!r}, not a number")
        clean.append(float(v) if math.isfinite(v) else None)
    r["losses"] = clean
    if not isinstance(r["config"], Mapping):
        raise StoreError(f"{where}: config must be a dict (the attack's options; {{}} when none), got "
                         f"{type(r['config']).__name__}")
    r["config"] = dict(r["config"])
    if "suffix_ids" in r and r["suffix_ids"] is not None:
        ids = r["suffix_ids"]
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
            raise StoreError(f"{where}: suffix_ids must be a list of non-negative ints (token ids)")
        if not _nonempty_str(r.get("tokenizer_hash")):
            raise StoreError(f"{where}: suffix_ids need tokenizer_hash (pysafegeom.attacks.store.tokenizer_hash(tokenizer)) "
                             f"so a reader can tell which tokens they name")
    if "case_index" in r and (isinstance(r["case_index"], bool) or not isinstance(r["case_index"], int) or r["case_index"] < 0):
        raise StoreError(f"{where}: case_index must be a non-negative int, got {r['case_index']!r}")
    for f in ("best_loss",):
        v = r.get(f)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise StoreError(f"{where}: {f} must be a number or None, got {v!r}")
    if r.get("success") is not None and not isinstance(r["success"], bool):
        raise StoreError(f"{where}: success must be true, false or null, got {r['success']!r}")
    return r


def record_key(rec: Mapping) -> tuple:
    """The identity of a record: ``(id, method, source_model_hash, case_index)`` (``case_index`` 0 when absent)."""
    return (rec["id"], rec["method"], rec["source_model_hash"], rec.get("case_index", 0))


def _final_loss(r: Mapping):
    if r.get("best_loss") is not None:
        return r["best_loss"]
    finite = [v for v in r.get("losses") or [] if v is not None]
    return min(finite) if finite else None


def harmbench_files(records: Iterable[Mapping]) -> tuple[dict[str, list[str]], dict[str, list[dict]]]:
    """``(test_cases, logs)`` in HarmBench's layouts, grouped by behaviour id in record order."""
    cases: dict[str, list[str]] = {}
    logs: dict[str, list[dict]] = {}
    for r in records:
        cases.setdefault(r["id"], []).append(r["test_case"])
        logs.setdefault(r["id"], []).append({"final_loss": _final_loss(r), "all_losses": list(r.get("losses") or []),
                                             "all_test_cases": list(r.get("all_test_cases") or [r["test_case"]])})
    return cases, logs


def _records_text(records: list[dict]) -> str:
    return "".join(json.dumps(_io.json_safe(r), ensure_ascii=False, allow_nan=False) + "\n" for r in records)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _manifest(records: list[dict], digest: str) -> dict:
    methods: dict[str, int] = {}
    sources: dict[str, dict] = {}
    for r in records:
        methods[r["method"]] = methods.get(r["method"], 0) + 1
        s = sources.setdefault(r["source_model"], {"hashes": [], "records": 0})
        s["records"] += 1
        if r["source_model_hash"] not in s["hashes"]:
            s["hashes"].append(r["source_model_hash"])
    return {"format": "pysafegeom test-case store", "format_version": FORMAT_VERSION, "records": len(records),
            "behaviors": len({r["id"] for r in records}), "methods": methods, "source_models": sources,
            "records_sha256": digest}


def write_harmbench(records: Iterable[Mapping], out_dir: str | os.PathLike) -> Path:
    """Write HarmBench's ``test_cases.json`` and ``logs.json`` for ``records`` into ``out_dir`` (created if
    missing; each file written atomically). Returns the folder."""
    recs = [validate_record(r, i, allow_unknown_behavior=True) for i, r in enumerate(records)]
    out = Path(out_dir)
    cases, logs = harmbench_files(recs)
    _io.atomic_write_text(out / "test_cases.json", json.dumps(cases, indent=1, ensure_ascii=False) + "\n")
    _io.atomic_write_text(out / "logs.json", json.dumps(_io.json_safe(logs), ensure_ascii=False) + "\n")
    return out


# ------------------------------------------------------------------------------------------ the store

def _read_jsonl(p: Path) -> list[dict]:
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise StoreError(f"{p} is not UTF-8 text ({exc}); it is not a records.jsonl this package wrote") from None
    out = []
    for n, line in enumerate(text.splitlines()):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise StoreError(f"{p}, line {n + 1}: not JSON ({exc}); the file is corrupt (a store rewrites it "
                                 f"atomically, so it was edited or written by something else)") from None
    return out


def _read_json(p: Path):
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"{p} is not a JSON file ({exc})") from None


def _run_json(folder: Path) -> dict:
    p = folder / "run.json"
    if not p.is_file():
        return {}
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


@contextmanager
def _locked(folder: Path):
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".store.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _methods_filter(method) -> set[str] | None:
    if method is None:
        return None
    if isinstance(method, str):
        return {method}
    ms = set(method)
    if not all(isinstance(m, str) for m in ms):
        raise StoreError(f"method must be a string, a list of strings or None, got {method!r}")
    return ms


class TestCaseStore:
    """A folder of test cases (see the module docstring): ``TestCaseStore(path)`` opens it, or creates it on
    the first :meth:`add`. ``read_only=True`` (and stores made by :meth:`from_records`, e.g. imports) refuse
    :meth:`add`.

    Opening reads ``records.jsonl``; records without ``method`` take it from the folder's ``run.json``
    (``method`` key), as old GCG run folders have it. The records are kept in file order.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, path: str | os.PathLike, *, read_only: bool = False):
        if not isinstance(path, (str, os.PathLike)):
            raise StoreError(f"a store path must be a string or path, got {type(path).__name__}")
        self.path = Path(path)
        self.read_only = read_only
        self.name = self.path.name
        self.origin = str(self.path)
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"{self.path} is a file, not a store folder; open it with open_cases() to import it")
        self._records = self._load()
        self._repair()

    @classmethod
    def from_records(cls, records: Iterable[Mapping], *, name: str = "imported", origin: str | None = None,
                     allow_unknown_behavior: bool = True) -> "TestCaseStore":
        """A read-only, in-memory store of ``records`` (validated; ``behavior`` may be None when allowed)."""
        self = cls.__new__(cls)
        self.path = None
        self.read_only = True
        self.name = name
        self.origin = origin or name
        self._records = [validate_record(r, i, allow_unknown_behavior=allow_unknown_behavior)
                         for i, r in enumerate(records)]
        return self

    # -------------------------------------------------------------------------- reading
    def _load(self) -> list[dict]:
        f = self.path / "records.jsonl"
        if not f.is_file():
            return []
        raw = _read_jsonl(f)
        default_method = None
        if any(isinstance(r, dict) and "method" not in r for r in raw):
            default_method = _run_json(self.path).get("method")
            if not _nonempty_str(default_method):
                raise StoreError(f"{f}: some records have no method and {self.path / 'run.json'} names none; add a "
                                 f"\"method\" field to the records (e.g. \"gcg\")")
        out = []
        for i, r in enumerate(raw):
            if isinstance(r, dict) and "method" not in r:
                r = dict(r, method=default_method)
            out.append(validate_record(r, i))
        return out

    def _repair(self) -> None:
        """Rebuild the derived files when ``store.json`` names another ``records.jsonl`` than the one on disk
        (a writer killed between the renames). Folders without ``store.json`` (plain GCG runs) are not touched."""
        if self.read_only or self.path is None or not (self.path / "store.json").is_file():
            return
        try:
            manifest = json.loads((self.path / "store.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            manifest = {}
        f = self.path / "records.jsonl"
        digest = _digest(f.read_text(encoding="utf-8")) if f.is_file() else _digest("")
        if isinstance(manifest, dict) and manifest.get("records_sha256") == digest:
            return
        try:
            with _locked(self.path):  # re-read under the lock: a writer may have finished meanwhile
                self._records = self._load()
                digest = _digest(f.read_text(encoding="utf-8")) if f.is_file() else _digest("")
                self._write_derived(self._records, digest)
        except OSError:  # a read-only copy: the API derives everything from records.jsonl anyway
            pass

    def records(self) -> list[dict]:
        """Every record (copies), in store order."""
        return [dict(r) for r in self._records]

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self):
        return iter(self.records())

    def __repr__(self) -> str:
        return f"TestCaseStore({self.origin!r}, {len(self)} records, methods {self.methods()})"

    def methods(self) -> list[str]:
        """The method names present, in first-seen order."""
        return list(dict.fromkeys(r["method"] for r in self._records))

    def source_models(self) -> list[str]:
        """The source model names present, in first-seen order."""
        return list(dict.fromkeys(r["source_model"] for r in self._records))

    def behaviors(self) -> dict[str, str | None]:
        """``{behavior id: behaviour text}`` (None where an import did not know it), in first-seen order."""
        out: dict[str, str | None] = {}
        for r in self._records:
            if out.get(r["id"]) is None:
                out[r["id"]] = r["behavior"]
        return out

    def select(self, method=None, ids=None) -> list[dict]:
        """The records of ``method`` (a name or several; None: all) and behaviour ``ids`` (None: all), copies."""
        ms = _methods_filter(method)
        if isinstance(ids, str):
            ids = [ids]
        keep = None if ids is None else set(ids)
        return [dict(r) for r in self._records
                if (ms is None or r["method"] in ms) and (keep is None or r["id"] in keep)]

    def test_cases(self, method=None) -> dict[str, list[str]]:
        """HarmBench's ``{behavior_id: [test case, ...]}`` for ``method`` (None: every method)."""
        return harmbench_files(self.select(method))[0]

    # -------------------------------------------------------------------------- writing
    def add(self, records: Iterable[Mapping]) -> "TestCaseStore":
        """Validate ``records`` (all of them, before anything is written), replace those with the same key
        (:func:`record_key`) and rewrite the folder atomically. Returns self."""
        if self.read_only:
            raise StoreError(f"the store {self.origin} is read-only (an import or opened with read_only=True); create a "
                             f"TestCaseStore(folder) and add these records there")
        if isinstance(records, Mapping):
            records = [records]
        new = [validate_record(r, i) for i, r in enumerate(records)]
        _io.check_output_path(self.path, overwrite=True, kind="dir")  # a file in the way, an unwritable parent
        with _locked(self.path):
            current = self._load()  # another writer may have added since we opened
            index = {record_key(r): i for i, r in enumerate(current)}
            for r in new:
                k = record_key(r)
                if k in index:
                    current[index[k]] = r
                else:
                    index[k] = len(current)
                    current.append(r)
            text = _records_text(current)
            _io.atomic_write_text(self.path / "records.jsonl", text)  # the source of truth, first
            self._records = current
            self._write_derived(current, _digest(text))
        if _io.read_marker(self.path) is None:
            _io.mark_dir(self.path, "test cases")
        return self

    def _write_derived(self, records: list[dict], digest: str) -> None:
        cases, logs = harmbench_files(records)
        _io.atomic_write_text(self.path / "test_cases.json", json.dumps(cases, indent=1, ensure_ascii=False) + "\n")
        _io.atomic_write_text(self.path / "logs.json", json.dumps(_io.json_safe(logs), ensure_ascii=False) + "\n")
        _io.atomic_write_text(self.path / "store.json", json.dumps(_manifest(records, digest), indent=1) + "\n")


# ------------------------------------------------------------------------------------------ making records

def _behaviour(b, i: int) -> tuple[str, str, str | None, str | None]:
    """``(id, text, target, category)`` of a :class:`~pysafegeom.data.Prompt`, a mapping or a plain string."""
    if isinstance(b, str):
        if not b.strip():
            raise StoreError(f"behaviour {i} is an empty string")
        return f"behavior-{i:05d}", b, None, None
    if isinstance(b, Mapping):
        text = b.get("text", b.get("behavior"))
        bid = b.get("id", f"behavior-{i:05d}")
        meta = b.get("meta") or {}
        target, category = b.get("target", meta.get("target")), b.get("category")
    elif hasattr(b, "text") and hasattr(b, "id"):
        text, bid = b.text, b.id
        target, category = (getattr(b, "meta", None) or {}).get("target"), getattr(b, "category", None)
    else:
        raise StoreError(f"behaviour {i} is a {type(b).__name__}; pass pysafegeom.data.Prompt objects, dicts with "
                         f"id and text, or strings")
    if not _nonempty_str(text) or not _nonempty_str(bid):
        raise StoreError(f"behaviour {i}: id and text must be non-empty strings, got id={bid!r}, text={text!r}")
    return str(bid), text, target if isinstance(target, str) else None, category


def _base(bid, text, target, category, method, source_model, test_case, config) -> dict:
    rec = {"id": bid, "behavior": text, "method": method, "source_model": source_model,
           "source_model_hash": source_model, "test_case": test_case, "target": target, "losses": [],
           "config": config}
    if category is not None:
        rec["category"] = category
    return rec


def direct_records(behaviors, *, source_model: str = "none") -> list[dict]:
    """Records of method ``"direct"``: each behaviour sent as it is (``test_case`` = the behaviour text).
    ``behaviors``: :class:`~pysafegeom.data.Prompt` objects (id, text, ``meta["target"]``), dicts or strings."""
    if isinstance(behaviors, (str, Mapping)):
        behaviors = [behaviors]
    out = []
    for i, b in enumerate(behaviors):
        bid, text, target, cat = _behaviour(b, i)
        out.append(_base(bid, text, target, cat, "direct", source_model, text, {}))
    if not out:
        raise StoreError("no behaviours given: direct_records needs at least one")
    return out


def apply_template(template: str, behavior: str, name: str = "template") -> str:
    """``template`` with every ``{behavior}`` / ``[REPLACE]`` replaced by ``behavior`` (no other brace is read)."""
    if not isinstance(template, str) or not any(p in template for p in PLACEHOLDERS):
        raise StoreError(f"template {name!r} has no placeholder: put {PLACEHOLDERS[0]} or {PLACEHOLDERS[1]} where the "
                         f"behaviour goes")
    out = template
    for p in PLACEHOLDERS:
        out = out.replace(p, behavior)
    return out


def template_records(behaviors, templates: Mapping[str, str], *, source_model: str = "none") -> list[dict]:
    """Records of method ``"template:<name>"``, one per (template, behaviour): the behaviour put where the
    template holds ``{behavior}`` or ``[REPLACE]``. A template without a placeholder, or an empty name, raises
    :class:`StoreError`. ``config`` records the template text."""
    if not isinstance(templates, Mapping) or not templates:
        raise StoreError("templates must be a non-empty mapping {name: template text}")
    for name, t in templates.items():
        if not _nonempty_str(name) or any(c.isspace() for c in name):
            raise StoreError(f"template name {name!r} must be a non-empty string without spaces")
        apply_template(t, "x", name)
    if isinstance(behaviors, (str, Mapping)):
        behaviors = [behaviors]
    bs = [_behaviour(b, i) for i, b in enumerate(behaviors)]
    if not bs:
        raise StoreError("no behaviours given: template_records needs at least one")
    out = []
    for name, t in templates.items():
        for bid, text, target, cat in bs:
            out.append(_base(bid, text, target, cat, f"template:{name}", source_model, apply_template(t, text, name),
                             {"template": t}))
    return out


# ------------------------------------------------------------------------------------------ imports

def _is_jbb(d) -> bool:
    return isinstance(d, dict) and isinstance(d.get("jailbreaks"), list) and isinstance(d.get("parameters", {}), dict)


def _from_jbb(d: dict, p: Path, method, source_model) -> TestCaseStore:
    params = d.get("parameters") or {}
    m = method or str(params.get("method") or "unknown").lower()
    src = source_model or str(params.get("model") or "unknown")
    recs = []
    for i, jb in enumerate(d["jailbreaks"]):
        if not isinstance(jb, dict):
            raise StoreError(f"{p}: jailbreaks[{i}] is not an object")
        if jb.get("prompt") is None:  # the attack produced no prompt for this behaviour
            continue
        bid = jb.get("behavior") if _nonempty_str(jb.get("behavior")) else str(jb.get("index", i))
        rec = {"id": bid, "behavior": jb.get("goal"), "method": m, "source_model": src, "source_model_hash": src,
               "test_case": jb["prompt"], "target": None, "losses": [], "config": dict(params),
               "jbb_index": jb.get("index")}
        if jb.get("category") is not None:
            rec["category"] = jb["category"]
        if jb.get("response") is not None:
            rec["completion"] = jb["response"]
        if isinstance(jb.get("jailbroken"), bool):
            rec["success"] = jb["jailbroken"]
        recs.append(rec)
    return TestCaseStore.from_records(recs, name=p.stem, origin=str(p))


def _from_harmbench(cases, p: Path, folder: Path, method, behaviors, source_model) -> TestCaseStore:
    if not isinstance(cases, dict) or not all(isinstance(v, list) and all(isinstance(s, str) for s in v)
                                              for v in cases.values()):
        raise StoreError(f"{p} is not a HarmBench test_cases.json ({{behavior_id: [test case strings]}})")
    run = _run_json(folder)
    m = method or run.get("method") or "unknown"
    src = source_model or run.get("source_model") or "unknown"
    src_hash = run.get("source_model_hash") if not source_model and run.get("source_model_hash") else src
    known = {}
    for i, b in enumerate(behaviors or []):
        bid, text, target, cat = _behaviour(b, i)
        known[bid] = (text, target, cat)
    logs = {}
    if (folder / "logs.json").is_file():
        try:
            logs = json.loads((folder / "logs.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            logs = {}
    recs = []
    for bid, tcs in cases.items():
        text, target, cat = known.get(bid, (None, None, None))
        for j, tc in enumerate(tcs):
            if not tc.strip():
                continue
            log = (logs.get(bid) or [None] * (j + 1))[j] if isinstance(logs.get(bid), list) and j < len(logs[bid]) else None
            losses = [v for v in (log or {}).get("all_losses", []) if v is None or isinstance(v, (int, float))]
            rec = {"id": bid, "behavior": text, "method": m, "source_model": src, "source_model_hash": src_hash,
                   "test_case": tc, "target": target, "losses": losses, "config": dict(run.get("config") or {}),
                   "case_index": j}
            if cat is not None:
                rec["category"] = cat
            recs.append(rec)
    return TestCaseStore.from_records(recs, name=folder.name if p.name == "test_cases.json" else p.stem, origin=str(p))


def open_cases(path, *, method: str | None = None, behaviors=None, source_model: str | None = None) -> TestCaseStore:
    """Open test cases from any of the layouts below as a :class:`TestCaseStore` (read-only for imports):

    * a store folder, or a GCG run folder (``records.jsonl``; a ``records.jsonl`` file opens its folder);
    * a folder or file holding HarmBench's ``test_cases.json``: the method comes from ``method=``, else the
      folder's ``run.json``, else ``"unknown"``; the source model from ``source_model=``, else ``run.json``,
      else ``"unknown"``; behaviour texts (and targets) from ``behaviors`` (``Prompt`` objects whose ``id`` is
      the behaviour id), else None; losses from a ``logs.json`` beside it;
    * a JailbreakBench artifact JSON (``{"parameters": {...}, "jailbreaks": [...]}``): ``prompt`` -> ``test_case``,
      ``goal`` -> ``behavior``, the behaviour name (else its index) -> ``id``, ``parameters.method`` (lower-cased)
      -> ``method``, ``parameters.model`` -> ``source_model``; ``response`` and ``jailbroken`` are kept as
      ``completion`` and ``success``. Jailbreaks whose prompt is null are left out.

    A :class:`TestCaseStore` passes through. A missing path raises :class:`StoreMissing`; a folder without any
    of these raises :class:`StoreError`.
    """
    if isinstance(path, TestCaseStore):
        return path
    if not isinstance(path, (str, os.PathLike)):
        raise StoreError(f"cases must be a store folder, a file path or a TestCaseStore, got {type(path).__name__}")
    p = Path(path)
    if not p.exists():
        raise StoreMissing(f"{p} does not exist; give a test-case store folder, a HarmBench test_cases.json or a "
                           f"JailbreakBench artifact")
    if p.is_file() and p.name.endswith(".jsonl"):
        p = p.parent
    if p.is_dir():
        if (p / "records.jsonl").is_file():
            store = TestCaseStore(p)
            if method is not None:
                store = TestCaseStore.from_records(store.select(method), name=store.name, origin=str(p),
                                                   allow_unknown_behavior=False)
            return store
        if (p / "test_cases.json").is_file():
            return _from_harmbench(_read_json(p / "test_cases.json"), p / "test_cases.json", p, method, behaviors,
                                   source_model)
        for f in sorted(p.glob("*.json")):
            try:
                d = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if _is_jbb(d):
                return _from_jbb(d, f, method, source_model)
        raise StoreError(f"{p} holds no test cases: {NO_CASES}")
    d = _read_json(p)
    if _is_jbb(d):
        return _from_jbb(d, p, method, source_model)
    if isinstance(d, dict):
        return _from_harmbench(d, p, p.parent, method, behaviors, source_model)
    raise StoreError(f"{p} holds no test cases: {NO_CASES}")


# ------------------------------------------------------------------------------------------ exports

def write_jailbreakbench(records: Iterable[Mapping], path: str | os.PathLike, *, method: str, model: str,
                         attack_type: str = "white_box") -> Path:
    """Write ``records`` as a JailbreakBench artifact JSON at ``path`` (atomically).

    Maps ``behavior`` -> ``goal``, ``id`` -> ``behavior``, ``test_case`` -> ``prompt``, ``completion`` ->
    ``response``, ``success`` -> ``jailbroken``, ``category``, and ``jbb_index`` (else the position) -> ``index``.
    Fields with no counterpart here (query and token counts, defense, evaluation LLM) are null; the
    attack success rate is filled only when every record has a ``success``.
    """
    if attack_type not in ("white_box", "black_box", "transfer", "manual"):
        raise StoreError(f"attack_type must be 'white_box', 'black_box', 'transfer' or 'manual', got {attack_type!r}")
    for n, v in (("method", method), ("model", model)):
        if not _nonempty_str(v):
            raise StoreError(f"{n} must be a non-empty string, got {v!r}")
    recs = [validate_record(r, i, allow_unknown_behavior=True) for i, r in enumerate(records)]
    if not recs:
        raise StoreError("no records to write: a JailbreakBench artifact needs at least one")
    jbs = []
    for i, r in enumerate(recs):
        jbs.append({"index": r.get("jbb_index", i) if r.get("jbb_index") is not None else i, "goal": r["behavior"],
                    "behavior": r["id"], "category": r.get("category"), "prompt": r["test_case"],
                    "response": r.get("completion"), "number_of_queries": None, "queries_to_jailbreak": None,
                    "prompt_tokens": None, "response_tokens": None, "jailbroken": r.get("success")})
    successes = [j["jailbroken"] for j in jbs]
    known = all(isinstance(s, bool) for s in successes)
    params = {"method": method, "model": model, "attack_type": attack_type, "defense": None,
              "attack_success_rate": (sum(successes) / len(successes)) if known else None,
              "total_number_of_jailbreaks": sum(successes) if known else None, "number_of_submitted_prompts": len(jbs),
              "total_number_of_queries": None, "total_prompt_tokens": None, "total_response_tokens": None,
              "evaluation_date": None, "evaluation_llm_provider": None, "method_parameters": recs[0]["config"]}
    out = Path(path)
    _io.atomic_write_text(out, json.dumps(_io.json_safe({"parameters": params, "jailbreaks": jbs}), indent=1,
                                          ensure_ascii=False) + "\n")
    return out


__all__ = ["FORMAT_VERSION", "PLACEHOLDERS", "REQUIRED_FIELDS", "StoreError", "StoreMissing", "TestCaseStore",
           "apply_template", "direct_records", "gcg_ids", "harmbench_files", "open_cases", "record_key",
           "template_records", "tokenizer_hash", "validate_record", "write_harmbench", "write_jailbreakbench"]
