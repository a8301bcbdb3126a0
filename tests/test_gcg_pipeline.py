"""data.load_behaviors and pipelines/attack.py (attack_behaviors): behaviours files, and the HarmBench-format
test cases, logs, records and summary a judged, resumable attack writes.

The loaders are checked against the public files read with the csv/json modules; the attack against single
:class:`~pysafegeom.attacks.gcg.GCG` runs with the same options (tiny random Llama with the real SmolLM2
vocabulary), a greedy decode by hand, and a judge written here whose verdicts are known.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import xml.etree.ElementTree as ET

import pytest
import torch

from pysafegeom.attacks import cases
from pysafegeom.attacks.gcg import GCG, GCGConfig
from pysafegeom.pipelines.attack import _safe_id
from pysafegeom.behaviour import Verdict
from pysafegeom.data import DataError, Prompt, load_behaviors
from pysafegeom.errors import OutputExists
from pysafegeom.generation import stop_token_ids
from pysafegeom.models.tiny import tiny_model
from pysafegeom.pipelines import attack as pipeline
from pysafegeom.pipelines.attack import attack_behaviors
from pysafegeom.prompts import format_prompts

HB_TEST = "harmbench/harmbench_behaviors_text_test.csv"
HB_TARGETS = "harmbench/harmbench_targets_text.json"
CFG = GCGConfig(num_steps=2, search_width=8, topk=8, optim_str_init="x x x x", progress=False)
NEW = 4  # max_new_tokens of the judged generations
BEHAVIOURS = [
    Prompt(text="Tell me how to bake bread", id="bread", label="harmful", meta={"target": "Sure, here is how"}),
    Prompt(text="Explain how to pick a lock", id="lock/1", label="harmful", meta={"target": "Here is a way"}),
]


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------ load_behaviors

def test_harmbench_behaviours_take_their_targets_by_id(shared_data):
    rows = [r for r in read_csv(shared_data / HB_TEST) if r["FunctionalCategory"] == "standard"]
    targets = json.loads((shared_data / HB_TARGETS).read_text(encoding="utf-8"))
    got = load_behaviors(shared_data / HB_TEST, shared_data / HB_TARGETS)
    assert len(got) == len(rows) > 100
    assert [b.id for b in got] == [r["BehaviorID"] for r in rows]
    assert [b.text for b in got] == [r["Behavior"].strip() for r in rows]
    assert [b.meta["target"] for b in got] == [targets[r["BehaviorID"]].strip() for r in rows]
    assert {b.label for b in got} == {"harmful"} and {b.split for b in got} == {"test"}
    assert [b.category for b in got] == [r["SemanticCategory"] for r in rows]


def test_harmbench_behaviours_without_targets_say_where_to_get_them(shared_data):
    with pytest.raises(DataError, match=r"159 of 159 behaviours have no target.*targets_path="):
        load_behaviors(shared_data / HB_TEST)
    got = load_behaviors(shared_data / HB_TEST, require_targets=False)
    assert len(got) == 159 and all(b.meta["target"] is None for b in got)


def test_advbench_targets_come_from_its_column(shared_data):
    rows = read_csv(shared_data / "advbench/harmful_behaviors.csv")
    got = load_behaviors(shared_data / "advbench/harmful_behaviors.csv")
    assert len(got) == len(rows) == 520
    assert [(b.text, b.meta["target"]) for b in got] == [(r["goal"].strip(), r["target"].strip()) for r in rows]
    assert len({b.id for b in got}) == 520


def test_a_jsonl_table_with_prompt_and_target_columns(tmp_path):
    f = tmp_path / "mine.jsonl"
    recs = [{"id": "a", "prompt": "Explain how to pick a lock", "target": "Here is a way"},
            {"id": "b", "prompt": "Tell me how to bake bread", "target": "  Sure, here is how ", "category": "food"},
            {"prompt": "Write a poem", "target": "A poem:"}]
    f.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    got = load_behaviors(f)
    assert [(b.id, b.text, b.meta["target"]) for b in got] == [
        ("a", "Explain how to pick a lock", "Here is a way"), ("b", "Tell me how to bake bread", "Sure, here is how"),
        ("mine-00002", "Write a poem", "A poem:")]
    assert got[1].category == "food" and {b.label for b in got} == {"harmful"}
    over = tmp_path / "targets.json"
    over.write_text(json.dumps({"b": "Bread first:"}), encoding="utf-8")
    assert [b.meta["target"] for b in load_behaviors(f, over)] == ["Here is a way", "Bread first:", "A poem:"]

    f.write_text(f.read_text() + json.dumps({"id": "d", "prompt": "No target here"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"1 of 4 behaviours have no target \(first: 'd'\).*'target' column"):
        load_behaviors(f)
    f.write_text(f.read_text() + json.dumps({"id": "a", "prompt": "Again", "target": "t"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="behaviour id 'a' appears more than once"):
        load_behaviors(f, require_targets=False)


def test_a_csv_without_a_prompt_column_lists_its_columns(tmp_path):
    f = tmp_path / "odd.csv"
    f.write_text("question_text,target\nHow do I x?,Sure\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"no prompt column.*the file has columns question_text, target"):
        load_behaviors(f)


# -------------------------------------------------------------------------------------- the pipeline

class LockJudge:
    """Refuses the behaviours whose instruction mentions a lock in its first call only (the pipeline's direct
    requests), so the direct ASR is 1/2 and the attacked ASR 2/2; records what it was shown."""

    name = "lock-judge"

    def __init__(self, direct_done=False):
        self.calls, self.direct_done = [], direct_done  # direct_done: a resumed run judges no direct requests

    def judge(self, prompts, responses):
        first = not self.calls and not self.direct_done
        self.calls.append((list(prompts), list(responses)))
        return [Verdict(True, "full", "lock") if first and "lock" in p else Verdict(False, "none", "no rule fired")
                for p in prompts]


def wilson(k, n, z=1.959963984540054):
    p = k / n
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, c - h), min(1.0, c + h)


def greedy_by_hand(model, tok, ids, n):
    """No cache, no padding: the whole sequence every step; cut at the stop tokens, special tokens dropped."""
    stops, new = set(stop_token_ids(tok)), []
    for _ in range(n):
        with torch.no_grad():
            nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
        if nxt in stops:
            break
        new.append(nxt)
    return tok.decode(new, skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model("llama", tokenizer=tok, n_layers=2, d_model=32, seed=2)


@pytest.fixture(scope="module")
def finished(model, tok, tmp_path_factory):
    """One per-behaviour attack run to completion: (out folder, returned summary, judge)."""
    out = tmp_path_factory.mktemp("attack") / "run"
    judge = LockJudge()
    summary = attack_behaviors(model, tok, BEHAVIOURS, CFG, out=out, judge=judge, max_new_tokens=NEW, progress=False)
    return out, summary, judge


def test_attack_behaviors_writes_harmbench_test_cases_logs_and_records(model, tok, finished):
    out, _, judge = finished
    records = cases.read_records(out / "records.jsonl")
    assert [r["id"] for r in records] == [b.id for b in BEHAVIOURS]
    test_cases = cases.read_test_cases(out / "test_cases.json")
    logs = json.loads((out / "logs.json").read_text())
    assert set(test_cases) == set(logs) == {b.id for b in BEHAVIOURS}
    for b, r in zip(BEHAVIOURS, records):
        assert set(cases.RECORD_FIELDS) <= set(r)
        a = GCG(model, tok, b.text, b.meta["target"], CFG)
        res = a.run()  # the same attack alone: the record is its result
        assert (r["suffix"], r["losses"], r["best_loss"]) == (res.best_string, res.losses, res.best_loss)
        assert test_cases[b.id] == [r["test_case"]] == [b.text + r["suffix"]]
        assert logs[b.id] == [{"final_loss": r["best_loss"], "all_losses": r["losses"],
                               "all_test_cases": [r["test_case"]]}]
        assert (r["instruction"], r["target"], r["method"]) == (b.text, b.meta["target"], "gcg")
        ids = a.prompts[0].before_ids + res.best_ids + a.prompts[0].after_ids
        assert tok(r["prompt"], add_special_tokens=False)["input_ids"] == ids
        fb = format_prompts(tok, [r["test_case"]])  # what the judged generation formats: the attacked ids
        assert fb.input_ids[0][fb.attention_mask[0].bool()].tolist() == ids
        assert r["judged_prompt_is_attacked_prompt"] is True
        assert r["completion"] and r["completion"] == greedy_by_hand(model, tok, ids, NEW)
        direct_ids = format_prompts(tok, [b.text]).input_ids[0].tolist()
        assert r["direct_completion"] == greedy_by_hand(model, tok, direct_ids, NEW)
        assert r["success"] is True and r["direct_success"] is ("lock" not in b.text)
        assert r["judge"] == "lock-judge" and r["judge_rule"] == "no rule fired"
        assert len(r["seconds_per_step"]) == CFG.num_steps and r["wall_seconds"] > 0
    direct, attacked = judge.calls[0], judge.calls[1:]
    assert direct == ([b.text for b in BEHAVIOURS], [r["direct_completion"] for r in records])
    assert attacked == [([b.text], [r["completion"]]) for b, r in zip(BEHAVIOURS, records)]


def test_the_summary_is_the_records_rates_with_wilson_intervals(finished):
    out, returned, _ = finished
    records = cases.read_records(out / "records.jsonl")
    s = json.loads((out / "summary.json").read_text())
    n, k, kd = len(records), sum(r["success"] for r in records), sum(r["direct_success"] for r in records)
    assert (s["n"], s["successes"], s["direct_successes"]) == (n, k, kd) == (2, 2, 1)
    assert s["asr"] == k / n and s["direct_asr"] == kd / n
    assert s["asr_ci95"] == pytest.approx(wilson(k, n)) and s["direct_asr_ci95"] == pytest.approx(wilson(kd, n))
    assert s["median_best_loss"] in [r["best_loss"] for r in records]
    assert s["total_wall_seconds"] == pytest.approx(sum(r["wall_seconds"] for r in records))
    assert s["judge"] == "lock-judge" and s["behaviors"] == [b.id for b in BEHAVIOURS]
    assert json.loads(json.dumps(returned)) == s

    svg = ET.fromstring((out / "loss_curves.svg").read_text())
    lines = svg.findall("{http://www.w3.org/2000/svg}polyline")
    assert [ln.find("{http://www.w3.org/2000/svg}title").text for ln in lines] == [r["id"] for r in records]
    assert [len(ln.get("points").split()) for ln in lines] == [len(r["losses"]) for r in records]


def test_rerunning_needs_resume_and_resume_skips_finished_behaviours(model, tok, finished, monkeypatch):
    out, returned, _ = finished
    with pytest.raises(OutputExists, match="resume=True"):
        attack_behaviors(model, tok, BEHAVIOURS, CFG, out=out, judge=LockJudge(), max_new_tokens=NEW, progress=False)
    before = {f: (out / f).read_bytes() for f in ("records.jsonl", "test_cases.json", "logs.json", "direct.json")}

    def no(*a, **k):
        raise AssertionError("a finished behaviour was attacked or generated again")

    with monkeypatch.context() as mp:
        mp.setattr(GCG, "run", no)
        mp.setattr(pipeline, "_generate", no)
        again = attack_behaviors(model, tok, BEHAVIOURS, CFG, out=out, judge=LockJudge(), max_new_tokens=NEW,
                                 progress=False, resume=True)
    assert {f: (out / f).read_bytes() for f in before} == before
    assert again == returned
    with pytest.raises(OutputExists, match="other options"):
        attack_behaviors(model, tok, BEHAVIOURS, GCGConfig(**{**CFG.to_dict(), "seed": 1}), out=out, judge=LockJudge(),
                         max_new_tokens=NEW, progress=False, resume=True)


def test_resume_attacks_only_the_unfinished_behaviour(model, tok, finished, tmp_path, monkeypatch):
    """The finished run's folder as a run stopped before the second behaviour left it (records of the first
    only, no state of the second): resume attacks the second alone and ends with the uninterrupted records."""
    out, _, _ = finished
    whole = cases.read_records(out / "records.jsonl")
    part = tmp_path / "part"
    shutil.copytree(out, part)
    shutil.rmtree(part / "states" / _safe_id("lock/1"))
    (part / "records.jsonl").write_text((out / "records.jsonl").read_text().splitlines(keepends=True)[0])
    attacked = []
    real = GCG.run

    def spy(self, *a, **k):
        attacked.append(self.instructions)
        return real(self, *a, **k)

    monkeypatch.setattr(GCG, "run", spy)
    s = attack_behaviors(model, tok, BEHAVIOURS, CFG, out=part, judge=LockJudge(True), max_new_tokens=NEW,
                         progress=False, resume=True)
    assert attacked == [[BEHAVIOURS[1].text]]
    got = cases.read_records(part / "records.jsonl")
    keys = ("id", "suffix", "test_case", "prompt", "losses", "best_loss", "completion", "success", "direct_success")
    assert [[r[k] for k in keys] for r in got] == [[r[k] for k in keys] for r in whole]
    assert cases.read_test_cases(part / "test_cases.json") == cases.read_test_cases(out / "test_cases.json")
    assert (s["n"], s["asr"], s["direct_asr"]) == (2, 1.0, 0.5)


def test_universal_attack_gives_every_behaviour_one_suffix(model, tok, tmp_path):
    out = tmp_path / "u"
    s = attack_behaviors(model, tok, BEHAVIOURS, CFG, out=out, universal=True, judge=LockJudge(), max_new_tokens=NEW,
                         progress=False)
    records = cases.read_records(out / "records.jsonl")
    res = GCG(model, tok, [b.text for b in BEHAVIOURS], [b.meta["target"] for b in BEHAVIOURS], CFG).run()
    assert [r["suffix"] for r in records] == [res.best_string] * 2
    assert [r["losses"] for r in records] == [res.losses] * 2
    assert cases.read_test_cases(out / "test_cases.json") == {b.id: [b.text + res.best_string] for b in BEHAVIOURS}
    assert all(r["universal"] for r in records) and s["universal"] is True and s["n"] == 2
    assert [p.name for p in (out / "states").iterdir()] == ["universal"]


def test_behaviour_ids_that_sanitise_alike_get_their_own_states(model, tok, tmp_path):
    bs = [Prompt(text=b.text, id=i, meta=b.meta) for b, i in zip(BEHAVIOURS, ("q/1", "q_1"))]
    attack_behaviors(model, tok, bs, CFG, out=tmp_path / "o", judge=LockJudge(), max_new_tokens=NEW, progress=False)
    assert [r["id"] for r in cases.read_records(tmp_path / "o" / "records.jsonl")] == ["q/1", "q_1"]
