"""The pipelines on a placed model: ``analyze``, ``trajectory``, ``replay`` and the attack commands take
``device_map`` / ``max_memory`` / ``offload_folder`` (the CLI's ``--device-map`` / ``--max-memory`` /
``--offload-folder``) and load each model over the CPU and the disk with accelerate; the numbers equal those of the
whole model on the CPU (the same kernels on the same shapes: compared exactly, as tests/test_sharded.py explains)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("peft")

from pysafegeom.data import Prompt  # noqa: E402
from pysafegeom.errors import InvalidArgument  # noqa: E402
from trajectory_sets import HARMFUL, HARMLESS, XS  # noqa: E402
from trajectory_sets import SELECTION as OPTS  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:Attempting to save a model with offloaded modules"),
              pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")]
# the token embedding, block 1 and the head on the disk; block 0, the norm and the rotary table on the CPU
DISK_MAP = {"model.embed_tokens": "disk", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
            "model.rotary_emb": "cpu", "lm_head": "disk"}



@pytest.fixture(scope="module")
def setup(tok, tmp_path_factory):
    from pysafegeom.attacks.store import TestCaseStore
    from pysafegeom.models.tiny import tiny_model
    from pysafegeom.train import TrainConfig, run

    root = tmp_path_factory.mktemp("placed")
    tiny_model("llama", tokenizer=tok, n_layers=2, d_model=32, seed=5).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    run(str(root / "base"), None, [("Name a large mammal.", "The elephant."), ("Write malware.", "Sorry, I can't.")],
        TrainConfig(steps=2, batch_size=2, lr=2e-2, warmup_steps=0, max_len=48, seed=0, save_at=(0, 2)), root / "sft",
        progress=False)
    TestCaseStore(root / "cases").add([
        {"id": f"c{i}", "behavior": HARMFUL[i], "method": "gcg", "source_model": "tiny", "source_model_hash": "0" * 16,
         "test_case": HARMFUL[i] + " ! !", "target": "Sure", "losses": [1.0], "config": {}} for i in range(3)])
    return root


def _same_analysis(a, b):
    assert a.selection.layer == b.selection.layer and a.selection.position == b.selection.position
    for k in ("coupling", "effective_rank", "subspace_coupling"):
        assert json.dumps(a.metrics[k], sort_keys=True) == json.dumps(b.metrics[k], sort_keys=True), k


def test_analyze_a_placed_spec_equals_the_whole_model(setup, tmp_path):
    from pysafegeom.pipelines.analyze import analyze

    kw = dict(progress=False, **OPTS)
    whole = analyze(str(setup / "base"), HARMFUL, HARMLESS, XS, device="cpu", **kw)
    placed = analyze(str(setup / "base"), HARMFUL, HARMLESS, XS, device_map=DISK_MAP, offload_folder=tmp_path / "off",
                     **kw)
    _same_analysis(whole, placed)
    from pysafegeom.models import load_model

    model, tok = load_model(str(setup / "base"))
    with pytest.raises(ValueError, match="loaded already"):
        analyze(model, HARMFUL, HARMLESS, XS, tokenizer=tok, device_map="auto", **kw)


def test_trajectory_and_replay_of_placed_anchors_equal_the_whole_models(setup, tmp_path):
    from pysafegeom.attacks.replay import replay
    from pysafegeom.pipelines.trajectory import trajectory

    kw = dict(harmful=HARMFUL, harmless=HARMLESS, xstest=XS, benign=[Prompt("Name a colour.", "b0", reference="Red.")],
              cases=setup / "cases", progress=False, report=False, max_new_tokens=4, replay_max_new_tokens=4,
              batch_size=8, **OPTS)
    runs = {"sft": str(setup / "sft")}
    whole = trajectory(runs, out=tmp_path / "whole", device="cpu", **kw)
    placed = trajectory(runs, out=tmp_path / "placed", device_map=DISK_MAP, offload_folder=tmp_path / "off", **kw)
    assert placed.meta["loading"] == {"adapter_swaps": 0, "fresh_loads": 2}  # placed: each anchor loaded afresh
    for a, b in zip(whole.table, placed.table):
        for k in ("carrier", "kappa_mid_band", "kappa_sub", "effective_rank", "b", "fixed_source", "direct_asr"):
            assert a[k] == b[k], k
    with pytest.raises(InvalidArgument, match="device_map"):
        trajectory(runs, out=tmp_path / "bad", max_memory={"cpu": "1GiB"}, **kw)
    r_whole = replay(setup / "cases", str(setup / "base"), out=tmp_path / "r1", max_new_tokens=5, progress=False)
    r_placed = replay(setup / "cases", str(setup / "base"), out=tmp_path / "r2", max_new_tokens=5, progress=False,
                      device_map=DISK_MAP, offload_folder=tmp_path / "off2")
    assert json.loads((tmp_path / "r1" / "results.json").read_text()) == \
        json.loads((tmp_path / "r2" / "results.json").read_text())
    assert r_placed["target"]["hash"] == r_whole["target"]["hash"]


def test_cli_placement_flags(setup, tmp_path, capsys):
    from pysafegeom.cli import build_parser, main
    from pysafegeom.cli_args import placement_from_args

    p = build_parser()
    (tmp_path / "map.json").write_text(json.dumps(DISK_MAP))
    for argv in (["analyze", "--model", "m", "--out", "o"], ["trajectory", "--run", "a=x", "--out", "o"],
                 ["attack", "gcg", "--model", "m", "--behaviors", "b", "--out", "o"],
                 ["attack", "adaptive", "--models", "m", "--behaviors", "b", "--out", "o"],
                 ["attack", "replay", "--cases", "c", "--model", "m", "--out", "o"],
                 ["transfer", "--cases", "c", "--models", "m", "--out", "o"]):
        assert placement_from_args(p.parse_args(argv)) == {}
        got = placement_from_args(p.parse_args([*argv, "--device-map", "auto", "--max-memory", "0=20GiB,cpu=64GiB",
                                                "--offload-folder", "off"]))
        assert got == {"device_map": "auto", "max_memory": {0: "20GiB", "cpu": "64GiB"}, "offload_folder": "off"}
        assert placement_from_args(p.parse_args([*argv, "--device-map", str(tmp_path / "map.json")])) == \
            {"device_map": DISK_MAP}
        assert placement_from_args(p.parse_args([*argv, "--device-map", '{"": "cpu"}'])) == {"device_map": {"": "cpu"}}
        for bad in (["--max-memory", "20GiB"], ["--device-map", "[1, 2]"], ["--device-map", "{nope"]):
            with pytest.raises(SystemExit):
                p.parse_args([*argv, *bad])
    capsys.readouterr()
    # end to end: a replay on a placed target from the command line
    rc = main(["attack", "replay", "--cases", str(setup / "cases"), "--model", str(setup / "base"), "--out",
               str(tmp_path / "cli"), "--judge", "substring", "--max-new-tokens", "3", "--device-map",
               str(tmp_path / "map.json"), "--offload-folder", str(tmp_path / "off3")])
    assert rc == 0 and (tmp_path / "cli" / "results.json").is_file()
    assert "3 test cases" in capsys.readouterr().out
