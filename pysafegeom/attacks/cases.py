"""Test-case files an attack writes: HarmBench's ``test_cases.json`` and ``logs.json``, and our JSONL records.

* ``test_cases.json``: ``{behavior_id: [test case string, ...]}``, the file HarmBench's
  ``generate_completions`` reads (a test case is the whole user message: instruction and suffix).
* ``logs.json``: ``{behavior_id: [{"final_loss", "all_losses", "all_test_cases"}]}`` as HarmBench's GCG.
* ``records.jsonl``: one JSON object per behaviour (see :data:`RECORD_FIELDS`).

All three are rewritten atomically after every behaviour, so a killed run leaves complete files.
"""

from __future__ import annotations

import json
from pathlib import Path

from .._io import atomic_write_text, json_safe

RECORD_FIELDS = (
    "id", "method", "source_model", "source_model_hash", "config", "instruction", "target", "suffix",
    "test_case", "prompt", "losses", "best_loss", "seconds_per_step", "wall_seconds", "stopped_early",
    "judge", "success", "judge_rule", "completion", "direct_success", "direct_completion",
)


def read_records(path: str | Path) -> list[dict]:
    """The records of a ``records.jsonl`` (an empty list when the file does not exist)."""
    p = Path(path)
    if not p.is_file():
        return []
    out = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{p}, line {i + 1}: not JSON ({exc})") from exc
    return out


def write_all(out: str | Path, records: list[dict]) -> None:
    """Write ``records.jsonl``, ``test_cases.json`` and ``logs.json`` into ``out`` from the records."""
    out = Path(out)
    atomic_write_text(out / "records.jsonl", "".join(json.dumps(json_safe(r), ensure_ascii=False) + "\n" for r in records))
    cases: dict[str, list[str]] = {}
    logs: dict[str, list[dict]] = {}
    for r in records:
        cases.setdefault(r["id"], []).append(r["test_case"])
        logs.setdefault(r["id"], []).append({"final_loss": r["best_loss"], "all_losses": r["losses"],
                                             "all_test_cases": [r["test_case"]]})
    atomic_write_text(out / "test_cases.json", json.dumps(cases, indent=1, ensure_ascii=False) + "\n")
    atomic_write_text(out / "logs.json", json.dumps(json_safe(logs), ensure_ascii=False) + "\n")


def read_test_cases(path: str | Path) -> dict[str, list[str]]:
    """HarmBench's ``test_cases.json`` -> ``{behavior_id: [test case, ...]}``, checked."""
    p = Path(path)
    d = json.loads(p.read_text(encoding="utf-8"))
    if not isinstance(d, dict) or not all(isinstance(v, list) and all(isinstance(s, str) for s in v) for v in d.values()):
        raise ValueError(f"{p} is not a HarmBench test_cases.json ({{behavior_id: [strings]}})")
    return d
