"""pysafegeom.data: bundled prompt sets, public-format loaders, load_prompts dispatch, splitting."""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import statistics
from importlib import resources

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pysafegeom.data import (
    DEFAULT_SETS,
    DataError,
    Prompt,
    load_advbench,
    load_alpaca,
    load_default,
    load_harmbench,
    load_path,
    load_prompts,
    load_refusal_direction,
    load_table,
    load_xstest,
    split_prompts,
    texts,
)

NAMES = ["harmful", "harmless", "xstest_safe", "xstest_unsafe", "benign"]
COUNTS = {"harmful": 160, "harmless": 160, "xstest_safe": 60, "xstest_unsafe": 24, "benign": 60}
SPLIT_COUNTS = {
    "harmful": (96, 32, 32),
    "harmless": (96, 32, 32),
    "xstest_safe": (36, 12, 12),
    "xstest_unsafe": (14, 5, 5),
    "benign": (36, 12, 12),
}


def norm(s: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", s.lower()))


def raw_records(name):
    text = resources.files("pysafegeom").joinpath("datasets", f"{name}.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------- bundled


def test_default_set_names():
    assert list(DEFAULT_SETS) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_bundled_counts_and_fixed_splits(name):
    prompts = load_default(name)
    assert len(prompts) == COUNTS[name]
    assert all(isinstance(p, Prompt) and p.text and p.id for p in prompts)
    by_split = tuple(len(load_default(name, s)) for s in ("train", "val", "test"))
    assert by_split == SPLIT_COUNTS[name]
    assert sum(by_split) == len(prompts)
    # fixed: the split comes from the file, identical on every call
    assert [p.split for p in load_default(name)] == [r["split"] for r in raw_records(name)]


def test_minimum_sizes():
    assert len(load_default("harmful")) >= 160 and len(load_default("harmless")) >= 160
    assert len(load_default("xstest_safe")) >= 50 and len(load_default("xstest_unsafe")) >= 20
    assert len(load_default("benign")) >= 50


@pytest.mark.parametrize("name", NAMES)
def test_bundled_record_schema(name):
    recs = raw_records(name)
    for r in recs:
        assert {"id", "prompt", "split", "category", "label"} <= set(r), r
        assert r["split"] in ("train", "val", "test")
        assert isinstance(r["prompt"], str) and r["prompt"] == r["prompt"].strip() and r["prompt"]
        assert r["category"]
    labels = {r["label"] for r in recs}
    assert labels == {
        "harmful": {"harmful"},
        "harmless": {"harmless"},
        "xstest_safe": {"safe"},
        "xstest_unsafe": {"unsafe"},
        "benign": {"harmless"},
    }[name]


@pytest.mark.parametrize("name", NAMES)
def test_bundled_no_duplicates(name):
    prompts = load_default(name)
    assert len({norm(p.text) for p in prompts}) == len(prompts)
    assert len({p.id for p in prompts}) == len(prompts)


def test_bundled_sets_disjoint():
    seen = {}
    ids = set()
    for name in NAMES:
        for p in load_default(name):
            key = norm(p.text)
            assert key not in seen, f"{p.text!r} is in both {seen[key]} and {name}"
            seen[key] = name
            assert p.id not in ids
            ids.add(p.id)
    harmful = {norm(p.text) for p in load_default("harmful")}
    harmless = {norm(p.text) for p in load_default("harmless")}
    assert not harmful & harmless


def test_harmful_and_harmless_are_stratified_and_length_matched():
    for name in ("harmful", "harmless"):
        prompts = load_default(name)
        cats = {p.category for p in prompts}
        assert len(cats) >= 10
        for c in cats:
            splits = [p.split for p in prompts if p.category == c]
            assert {s: splits.count(s) for s in set(splits)} == {"train": 6, "val": 2, "test": 2}, (name, c)
    assert {"weapons", "cybercrime", "fraud", "drugs", "violence", "harassment", "self_harm", "privacy",
            "disinformation", "hate"} <= {p.category for p in load_default("harmful")}
    assert {p.category for p in load_default("harmful")} == {p.category for p in load_default("harmless")}
    words = {n: statistics.mean(len(p.text.split()) for p in load_default(n)) for n in ("harmful", "harmless")}
    assert 0.9 < words["harmful"] / words["harmless"] < 1.1, words


def test_harmful_and_harmless_are_paired_twins():
    """Every harmless prompt is the twin of one harmful prompt: same split, category and request form
    (first word), similar length, and no final punctuation on either side (t_inst is the last word)."""
    harmful, harmless = raw_records("harmful"), raw_records("harmless")
    by_id = {r["id"]: r for r in harmless}
    assert sorted(r["pair"] for r in harmful) == sorted(by_id)
    for h in harmful:
        twin = by_id[h["pair"]]
        assert twin["pair"] == h["id"]
        assert (twin["split"], twin["category"]) == (h["split"], h["category"]), (h, twin)
        assert twin["prompt"].split()[0] == h["prompt"].split()[0], (h["prompt"], twin["prompt"])
        assert abs(len(twin["prompt"].split()) - len(h["prompt"].split())) <= 4, (h["prompt"], twin["prompt"])
    for r in harmful + harmless:
        assert r["prompt"][-1].isalnum(), r["prompt"]
    # the documented split rule (datasets/README.md), recomputed
    import random

    pattern, k, want = ["train", "val", "train", "test", "train"], 0, {}
    for cat in dict.fromkeys(r["category"] for r in harmful):
        ids = [r["id"] for r in harmful if r["category"] == cat]
        order = list(range(len(ids)))
        random.Random(f"pairs/{cat}").shuffle(order)
        for i in order:
            want[ids[i]], k = pattern[k % 5], k + 1
    assert {r["id"]: r["split"] for r in harmful} == want


def test_xstest_style_types():
    safe = load_default("xstest_safe")
    types = {p.meta["type"] for p in safe}
    assert {"homonyms", "figurative_language", "safe_targets", "safe_contexts", "definitions",
            "historical_events", "privacy_public", "privacy_fictional"} <= types
    assert all(p.category == p.meta["type"] for p in safe)
    unsafe = load_default("xstest_unsafe")
    assert all(p.meta["type"].startswith("contrast_") for p in unsafe)
    assert len({p.meta["type"] for p in unsafe}) >= 6


def test_benign_references_are_short():
    for p in load_default("benign"):
        assert p.reference and p.reference == p.reference.strip()
        n_sent = len(re.findall(r"[.!?](?:\s|$)", p.reference))
        assert 1 <= n_sent <= 3 and len(p.reference) < 300, p.reference


def test_load_default_errors_and_fresh_objects():
    with pytest.raises(ValueError, match="harmful, harmless, xstest_safe, xstest_unsafe, benign"):
        load_default("advbench")
    with pytest.raises(ValueError, match="valid splits"):
        load_default("harmful", "dev")
    a = load_default("xstest_safe")
    a[0].meta["type"] = "changed"
    assert load_default("xstest_safe")[0].meta["type"] != "changed"


def test_bundled_prompts_not_copied_from_public_sets(shared_data):
    public = set()
    public |= {norm(r["goal"]) for r in csv.DictReader(open(shared_data / "advbench/harmful_behaviors.csv"))}
    hb = shared_data / "harmbench/harmbench_behaviors_text_all.csv"
    public |= {norm(r["Behavior"]) for r in csv.DictReader(open(hb))}
    public |= {norm(r["prompt"]) for r in csv.DictReader(open(shared_data / "xstest/xstest_prompts.csv"))}
    for f in (shared_data / "refusal_direction/splits").glob("*.json"):
        public |= {norm(r["instruction"]) for r in json.loads(f.read_text())}
    for f in (shared_data / "alpaca_eval").glob("*.json"):
        public |= {norm(r["instruction"]) for r in json.loads(f.read_text())}
    copied = [p.text for n in NAMES for p in load_default(n) if norm(p.text) in public]
    assert not copied


# ------------------------------------------------------------------------------ public-format loaders


def test_load_advbench(shared_data):
    prompts = load_advbench(shared_data / "advbench/harmful_behaviors.csv")
    assert len(prompts) == 520
    assert all(p.label == "harmful" and p.meta["target"].startswith("Sure, here") for p in prompts)
    assert prompts[0].id == "advbench-000" and prompts[0].text.startswith("Write a script that can exploit")
    assert len({p.id for p in prompts}) == 520


def test_load_harmbench(shared_data):
    hb = shared_data / "harmbench"
    all_csv, targets = hb / "harmbench_behaviors_text_all.csv", hb / "harmbench_targets_text.json"
    std = load_harmbench(all_csv, targets)
    assert len(std) == 200
    assert all(p.meta["functional_category"] == "standard" and p.meta["target"] for p in std)
    assert std[0].id == "dimethylmercury_instructions_home" and std[0].category == "chemical_biological"
    assert all(p.split is None for p in std)
    assert len(load_harmbench(all_csv, functional_category=None)) == 400
    assert len(load_harmbench(all_csv, functional_category="copyright")) == 100
    ctx = load_harmbench(all_csv, functional_category="contextual", include_context=True)
    assert len(ctx) == 100 and all("\n\n---\n\n" in p.text and p.meta["context"] for p in ctx)
    bare = load_harmbench(all_csv, functional_category="contextual")
    assert all(c.text.endswith(b.text) and "---" not in b.text for c, b in zip(ctx, bare))
    val = load_harmbench(hb / "harmbench_behaviors_text_val.csv")
    test = load_harmbench(hb / "harmbench_behaviors_text_test.csv", functional_category=None)
    assert len(val) == 41 and {p.split for p in val} == {"val"}
    assert len(test) == 320 and {p.split for p in test} == {"test"}
    assert all(p.meta["target"] is None for p in val)
    with pytest.raises(DataError, match="FunctionalCategory='nonexistent'"):
        load_harmbench(all_csv, functional_category="nonexistent")


def test_load_xstest(shared_data):
    path = shared_data / "xstest/xstest_prompts.csv"
    safe, unsafe, both = load_xstest(path), load_xstest(path, "unsafe"), load_xstest(path, which="all")
    assert (len(safe), len(unsafe), len(both)) == (250, 200, 450)
    assert {p.label for p in safe} == {"safe"} and {p.label for p in unsafe} == {"unsafe"}
    assert safe[0].id == "xstest-1" and safe[0].category == "homonyms" == safe[0].meta["type"]
    assert all(safe.count(p) == 1 for p in safe[:5])
    assert {p.category for p in safe if p.category == "homonyms"} and sum(p.category == "homonyms" for p in safe) == 25
    with pytest.raises(DataError, match="which"):
        load_xstest(path, which="harmful")


@pytest.mark.parametrize(
    "name,n,label,split",
    [
        ("harmful_train", 260, "harmful", "train"),
        ("harmful_val", 39, "harmful", "val"),
        ("harmless_train", 18793, "harmless", "train"),
        ("harmless_val", 6264, "harmless", "val"),
        ("harmless_test", 6266, "harmless", "test"),
    ],
)
def test_load_refusal_direction(shared_data, name, n, label, split):
    prompts = load_refusal_direction(shared_data / f"refusal_direction/splits/{name}.json")
    assert len(prompts) == n
    assert {p.label for p in prompts} == {label} and {p.split for p in prompts} == {split}
    assert prompts[0].id == f"{name}-00000"


def test_load_refusal_direction_categories(shared_data):
    val = load_refusal_direction(shared_data / "refusal_direction/splits/harmful_val.json")
    assert val[0].category == "chemical_biological"


@pytest.mark.parametrize("name,n_ref", [("text_davinci_003_model_outputs", 803), ("gpt4_1106_preview_model_outputs", 805)])
def test_load_alpaca(shared_data, name, n_ref):
    prompts = load_alpaca(shared_data / f"alpaca_eval/{name}.json")
    assert len(prompts) == 805
    assert sum(p.reference is not None for p in prompts) == n_ref  # two davinci outputs are empty strings
    assert all(p.reference is None or p.reference.strip() for p in prompts)
    assert {p.label for p in prompts} == {"harmless"}
    assert prompts[0].text.startswith("What are the names of some famous actors")
    assert prompts[0].meta["dataset"] == "helpful_base" and prompts[0].category == "helpful_base"


def test_load_alpaca_joins_input(tmp_path):
    f = tmp_path / "alpaca.json"
    f.write_text(json.dumps([
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
        {"instruction": "Name a colour.", "input": "", "output": "Blue"},
    ]))
    a, b = load_alpaca(f)
    assert a.text == "Translate to French.\n\nGood morning" and a.reference == "Bonjour"
    assert b.text == "Name a colour." and b.reference == "Blue"


def test_load_table_on_public_jsonl(shared_data):
    path = shared_data / "stanford_alpaca_seed/seed_tasks.jsonl"
    prompts = load_table(path, "instruction")
    assert len(prompts) == 175 and prompts[0].id == "seed_task_0" and "name" in prompts[0].meta
    with pytest.raises(DataError, match=r"missing column\(s\) 'prompt'.*'instruction'"):
        load_table(path, "prompt")


def test_load_table_fields(tmp_path):
    f = tmp_path / "mine.csv"
    f.write_text("text,split,category,reference,extra\nHello there,train,greet,Hi,1\nBye now,,,,2\n")
    a, b = load_table(f, "text")
    assert (a.text, a.split, a.category, a.reference, a.meta) == ("Hello there", "train", "greet", "Hi", {"extra": "1"})
    assert (b.id, b.split, b.category, b.reference) == ("mine-00001", None, None, None)
    g = tmp_path / "bad.jsonl"
    g.write_text('{"prompt": "a", "split": "dev"}\n')
    with pytest.raises(DataError, match="split 'dev'"):
        load_table(g, "prompt")
    t = tmp_path / "tabs.tsv"
    t.write_text("prompt\tn\nOne prompt\t1\n")
    assert texts(load_table(t, "prompt")) == ["One prompt"]


# ------------------------------------------------------------------------------------------ bad input

LOADERS = [
    (load_advbench, "AdvBench CSV"),
    (load_harmbench, "HarmBench behaviours CSV"),
    (load_xstest, "XSTest CSV"),
    (load_refusal_direction, "refusal_direction JSON"),
    (load_alpaca, "Alpaca-style JSON"),
    (lambda p: load_table(p, "prompt"), "CSV/TSV"),
    (load_path, "JSONL"),
    (load_prompts, "JSONL"),
]


@pytest.mark.parametrize("loader,expected", LOADERS)
def test_missing_path(tmp_path, loader, expected):
    with pytest.raises(FileNotFoundError, match=f"does not exist.*expected.*{expected}"):
        loader(tmp_path / "nope.csv")


@pytest.mark.parametrize(
    "loader,suffix",
    [(load_advbench, ".csv"), (load_harmbench, ".csv"), (load_xstest, ".csv"), (load_refusal_direction, ".json"),
     (load_alpaca, ".json"), (lambda p: load_table(p, "prompt"), ".jsonl"), (lambda p: load_table(p, "prompt"), ".csv"),
     (load_path, ".csv"), (load_path, ".json"), (load_path, ".jsonl"), (load_path, ".txt")],
)
def test_empty_file(tmp_path, loader, suffix):
    f = tmp_path / f"empty{suffix}"
    f.write_text("\n" if suffix != ".json" else "  ")
    with pytest.raises(DataError, match="contains no prompts"):
        loader(f)


def test_zero_records(tmp_path):
    header_only = tmp_path / "h.csv"
    header_only.write_text("goal,target\n")
    with pytest.raises(DataError, match="contains no prompts"):
        load_advbench(header_only)
    with pytest.raises(DataError, match="contains no prompts"):
        load_prompts(header_only)
    empty_list = tmp_path / "e.json"
    empty_list.write_text("[]")
    with pytest.raises(DataError, match="contains no prompts"):
        load_refusal_direction(empty_list)


def test_missing_columns_listed(tmp_path):
    f = tmp_path / "adv.csv"
    f.write_text("question,answer\nWhat?,That.\n")
    with pytest.raises(DataError, match=r"missing column\(s\) 'goal'; available columns: 'question', 'answer'"):
        load_advbench(f)
    with pytest.raises(DataError, match="'Behavior'"):
        load_harmbench(f)
    with pytest.raises(DataError, match="'prompt', 'type', 'label'"):
        load_xstest(f)
    with pytest.raises(DataError, match=r"available columns: 'question', 'answer'"):
        load_table(f, "prompt")
    g = tmp_path / "rd.json"
    g.write_text(json.dumps([{"text": "hi"}]))
    with pytest.raises(DataError, match="'instruction'"):
        load_refusal_direction(g)
    with pytest.raises(DataError, match="'output'"):
        load_alpaca(tmp_path / "rd.json")
    h = tmp_path / "weird.csv"
    h.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="no prompt column found.*'a', 'b'.*column="):
        load_prompts(h)


def test_malformed_json(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text("[{")
    with pytest.raises(DataError, match="not valid JSON"):
        load_refusal_direction(f)
    f.write_text('{"instruction": "x"}')
    with pytest.raises(DataError, match="not a list"):
        load_alpaca(f)
    g = tmp_path / "bad.jsonl"
    g.write_text('{"prompt": "ok"}\nnot json\n')
    with pytest.raises(DataError, match="line 2"):
        load_table(g, "prompt")
    tp = tmp_path / "targets.json"
    tp.write_text("[]")
    hb = tmp_path / "hb.csv"
    hb.write_text("Behavior,FunctionalCategory,BehaviorID\nDo a thing,standard,x\n")
    with pytest.raises(DataError, match="not an object"):
        load_harmbench(hb, tp)


def test_blank_prompts_skipped_with_count(tmp_path):
    f = tmp_path / "adv.csv"
    f.write_text('goal,target\n"First goal",t1\n"   ",t2\n,t3\n"Second goal",t4\n')
    with pytest.warns(UserWarning, match="skipped 2 record"):
        prompts = load_advbench(f)
    assert texts(prompts) == ["First goal", "Second goal"] and prompts[1].id == "advbench-003"
    g = tmp_path / "blank.jsonl"
    g.write_text('{"prompt": ""}\n{"prompt": "  "}\n')
    with pytest.warns(UserWarning), pytest.raises(DataError, match=r"contains no prompts \(2 empty\)"):
        load_table(g, "prompt")
    with pytest.warns(UserWarning, match="skipped 1"):
        assert texts(load_prompts(["a", " ", "b"])) == ["a", "b"]
    with pytest.warns(UserWarning), pytest.raises(DataError, match="contains no prompts"):
        load_prompts(["", "  "])
    with pytest.raises(DataError, match="contains no prompts"):
        load_prompts([])


def test_unsupported_inputs(tmp_path):
    f = tmp_path / "prompts.parquet"
    f.write_bytes(b"PAR1")
    with pytest.raises(DataError, match="unsupported format '.parquet'"):
        load_prompts(f)
    with pytest.raises(DataError, match="cannot load prompts from a int"):
        load_prompts(3)
    with pytest.raises(DataError, match="item 1 is a int"):
        load_prompts(["ok", 3])


# ------------------------------------------------------------------------------ load_prompts dispatch


def test_load_prompts_bundled():
    assert texts(load_prompts()) == texts(load_default("harmful"))
    assert texts(load_prompts(None, role="harmless", split="val")) == texts(load_default("harmless", "val"))
    assert texts(load_prompts("xstest_safe", split="test")) == texts(load_default("xstest_safe", "test"))
    with pytest.raises(ValueError, match="valid names"):
        load_prompts(None, role="nonsense")


def test_load_prompts_list():
    prompts = load_prompts(["How do I bake bread?", "  Tell me a joke. "], role="harmless")
    assert texts(prompts) == ["How do I bake bread?", "Tell me a joke."]
    assert [p.id for p in prompts] == ["harmless-00000", "harmless-00001"] and prompts[0].split is None
    mine = Prompt("x", "mine", split="val")
    assert load_prompts([mine], split="val") == [mine]
    many = [f"prompt number {i}" for i in range(10)]
    tr, va, te = (load_prompts(many, split=s) for s in ("train", "val", "test"))
    assert (len(tr), len(va), len(te)) == (6, 2, 2)
    assert sorted(texts(tr + va + te)) == sorted(many)
    assert texts(load_prompts(many, split="train")) == texts(tr)


@pytest.mark.parametrize(
    "rel,n,first_id",
    [
        ("advbench/harmful_behaviors.csv", 520, "advbench-000"),
        ("harmbench/harmbench_behaviors_text_all.csv", 200, "dimethylmercury_instructions_home"),
        ("xstest/xstest_prompts.csv", 250, "xstest-1"),
        ("refusal_direction/splits/harmful_train.json", 260, "harmful_train-00000"),
        ("alpaca_eval/text_davinci_003_model_outputs.json", 805, "text_davinci_003_model_outputs-00000"),
        ("stanford_alpaca_seed/seed_tasks.jsonl", 175, "seed_task_0"),
    ],
)
def test_load_prompts_dispatch_public(shared_data, rel, n, first_id):
    prompts = load_prompts(shared_data / rel)
    assert len(prompts) == n and prompts[0].id == first_id
    assert texts(load_prompts(str(shared_data / rel))) == texts(prompts)


def test_load_prompts_dispatch_kinds(shared_data):
    alpaca = load_prompts(shared_data / "alpaca_eval/text_davinci_003_model_outputs.json")
    assert sum(p.reference is not None for p in alpaca) == 803  # alpaca, not refusal_direction
    rd = load_prompts(shared_data / "refusal_direction/splits/harmful_val.json")
    assert rd[0].label == "harmful" and rd[0].split == "val"
    xs = load_prompts(shared_data / "xstest/xstest_prompts.csv", which="all")
    assert len(xs) == 450
    hb = load_prompts(
        shared_data / "harmbench/harmbench_behaviors_text_all.csv",
        targets_path=shared_data / "harmbench/harmbench_targets_text.json",
        functional_category=None,
    )
    assert len(hb) == 400 and all(p.meta["target"] for p in hb)
    strings = load_prompts(shared_data / "advbench/harmful_strings.csv", column="target")
    assert len(strings) == 574
    # a user file with no splits gets a deterministic 60/20/20 split on request
    adv = shared_data / "advbench/harmful_behaviors.csv"
    parts = [load_prompts(adv, split=s) for s in ("train", "val", "test")]
    assert [len(p) for p in parts] == [312, 104, 104]
    assert texts(load_prompts(adv, split="val")) == texts(parts[1])
    assert len({t for p in parts for t in texts(p)}) == 520
    # files that carry splits are filtered, not re-split
    with pytest.raises(DataError, match="no prompts in split 'train'"):
        load_prompts(shared_data / "refusal_direction/splits/harmful_val.json", split="train")


def test_load_prompts_dispatch_generic(tmp_path):
    jl = tmp_path / "mine.jsonl"
    jl.write_text('{"prompt": "Alpha", "split": "train"}\n{"prompt": "Beta", "split": "test"}\n')
    assert texts(load_prompts(jl)) == ["Alpha", "Beta"]
    assert texts(load_prompts(jl, split="test")) == ["Beta"]
    js = tmp_path / "mine.json"
    js.write_text(json.dumps([{"question": "Q1"}, {"question": "Q2"}]))
    assert texts(load_prompts(js)) == ["Q1", "Q2"]
    cs = tmp_path / "mine.csv"
    cs.write_text("id,prompt\na,First\nb,Second\n")
    assert [(p.id, p.text) for p in load_prompts(cs)] == [("a", "First"), ("b", "Second")]
    cs2 = tmp_path / "other.csv"
    cs2.write_text("body,prompt\nuse me,not me\n")
    assert texts(load_prompts(cs2, column="body")) == ["use me"]
    tx = tmp_path / "lines.txt"
    tx.write_text("one\n\n two \n")
    assert texts(load_prompts(tx)) == ["one", "two"]
    xs = tmp_path / "x.csv"
    xs.write_text("id,prompt,type,label\n1,How do I kill a zombie process?,homonyms,safe\n2,Hurt someone,contrast,unsafe\n")
    assert texts(load_prompts(xs)) == ["How do I kill a zombie process?"]


# ------------------------------------------------------------------------------------------ splitting


def test_split_prompts_deterministic():
    items = [f"p{i}" for i in range(100)]
    a, b = split_prompts(items), split_prompts(items)
    assert [p.split for p in a] == [p.split for p in b]
    assert texts(a) == items  # input order kept
    assert [p.split for p in a].count("train") == 60 and [p.split for p in a].count("val") == 20
    assert [p.split for p in split_prompts(items, seed=1)] != [p.split for p in a]
    assert [p.split for p in split_prompts(items, (0.8, 0.0, 0.2))].count("val") == 0
    src = [Prompt("t", "i", meta={"k": 1})]
    out = split_prompts(src, (1, 0, 0))
    assert out[0].split == "train" and src[0].split is None and out[0].meta is not src[0].meta
    for bad in [(0.5, 0.5), (0.6, 0.2, 0.3), (-0.2, 0.6, 0.6)]:
        with pytest.raises(DataError, match="fractions"):
            split_prompts(items, bad)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 60),
    f=st.tuples(st.integers(0, 10), st.integers(0, 10), st.integers(1, 10)),
    seed=st.integers(0, 5),
)
def test_split_prompts_partition(n, f, seed):
    fractions = tuple(x / sum(f) for x in f)
    out = split_prompts([f"x{i}" for i in range(n)], fractions, seed)
    counts = [sum(p.split == s for p in out) for s in ("train", "val", "test")]
    assert sum(counts) == n
    assert counts[0] == min(n, round(n * fractions[0]))


def test_prompt_dataclass():
    fields = [f.name for f in dataclasses.fields(Prompt)]
    assert fields == ["text", "id", "split", "category", "reference", "label", "meta"]
    p = Prompt("hello", "h-1")
    assert str(p) == "hello" and p.meta == {} and p.reference is None
