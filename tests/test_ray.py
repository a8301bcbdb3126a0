"""Ray fan-out for real: a local cluster of 2 CPU workers runs a tiny-model trajectory, a replay, a transfer matrix and
sparse adaptive attacks, and each result equals the single-process run's. One worker process is killed mid-run
(SIGKILL) and Ray's retry still ends in the complete, identical result; a rerun finds every unit done. Without ray=,
nothing imports Ray."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("peft")
ray = pytest.importorskip("ray")

from pysafegeom.data import Prompt  # noqa: E402
from pysafegeom.errors import InvalidArgument  # noqa: E402
from pysafegeom.scale import RayOptions, UnitFailed, ray_options, run_units  # noqa: E402
from trajectory_sets import BENIGN, EXAMPLES, HARMFUL, HARMLESS, OPTS, XS  # noqa: E402

pytestmark = pytest.mark.ray

TITLE = "ray::pysafegeom:"  # the process title of a worker running one of our units


def _case(bid: str, text: str, suffix: str) -> dict:
    return {"id": bid, "behavior": text, "method": "gcg", "source_model": "tiny", "source_model_hash": "0" * 16,
            "test_case": f"{text} {suffix}", "target": "Sure, here is", "losses": [1.0], "config": {}}


@pytest.fixture(scope="module")
def cluster():
    """One local cluster of 2 CPUs for the module (the pipelines use a cluster this process joined already)."""
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def setup(tok, tmp_path_factory, one_thread):
    """A tiny base, two LoRA runs of it (checkpoints 0, 2, 4 and 0, 2), a second base, and a 12-case store (torch on one
    thread for the module, as each worker runs: the same arithmetic)."""
    from pysafegeom.attacks.store import TestCaseStore
    from pysafegeom.models.tiny import tiny_model
    from pysafegeom.train import TrainConfig, run

    root = tmp_path_factory.mktemp("ray")
    for name, seed in (("base", 0), ("other", 3)):
        tiny_model("llama", tokenizer=tok, n_layers=2, d_model=32, seed=seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    for name, seed, save in (("sft", 0, (0, 2, 4)), ("sft2", 1, (0, 2))):
        run(str(root / "base"), None, EXAMPLES, TrainConfig(steps=max(save), batch_size=2, lr=2e-2, warmup_steps=0,
                                                            max_len=48, seed=seed, save_at=save), root / name,
            progress=False)
    store = root / "cases"
    TestCaseStore(store).add([_case(f"c{i}", HARMFUL[i % 10], s) for i, s in enumerate("x ! ? y z w q . , ; : -".split())])
    return root


def _strip(obj):
    """A result without its wall-clock times and worker pids (everything else must be equal)."""
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if not k.endswith("seconds") and k not in ("ray", "log", "pid")}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _workers() -> list[int]:
    pids = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if f.read().startswith(TITLE.encode()):
                        pids.append(int(pid))
            except OSError:
                continue
    return pids


def _kill_one_worker_during(fn, delay: float = 0.5, timeout: float = 120.0):
    """Run ``fn()`` in a thread; once a worker runs one of its units, wait ``delay`` s and SIGKILL that worker. Returns
    (fn's result, the killed pid)."""
    box = {}

    def go():
        try:
            box["result"] = fn()
        except BaseException as exc:  # re-raised in the test's thread
            box["error"] = exc

    th = threading.Thread(target=go)
    th.start()
    killed, t0 = None, time.time()
    while th.is_alive() and killed is None and time.time() - t0 < timeout:
        pids = _workers()
        if pids:
            time.sleep(delay)
            if th.is_alive() and pids[0] in _workers():
                os.kill(pids[0], signal.SIGKILL)
                killed = pids[0]
        time.sleep(0.05)
    th.join(timeout)
    assert not th.is_alive(), "the fanned-out run did not finish"
    if "error" in box:
        raise box["error"]
    return box["result"], killed


def _trajectory(s, out, runs=None, **kw):
    from pysafegeom.pipelines.trajectory import trajectory

    runs = runs or {"sft": str(s / "sft"), "sft2": str(s / "sft2")}
    return trajectory(runs, out=out, harmful=HARMFUL, harmless=HARMLESS, xstest=XS, benign=BENIGN, cases=s / "cases",
                      progress=False, report=False, **{**OPTS, **kw})


@pytest.fixture(scope="module")
def one_process(setup):
    return _trajectory(setup, setup / "one-process")


def test_trajectory_on_ray_equals_one_process_with_a_worker_killed(cluster, setup, one_process, tmp_path):
    one = one_process
    shutil.copytree(setup / "one-process", tmp_path / "one")
    fanned, killed = _kill_one_worker_during(lambda: _trajectory(setup, tmp_path / "ray", ray=True))
    assert killed is not None, "no worker was seen running a unit"
    assert fanned.meta["ray"]["units"] == 4  # sft2-0 is a zero LoRA update: copied from sft-0, not a task
    log = {e["anchor"]: e for e in fanned.meta["log"]}
    assert log["sft2-0"]["copied_from"] == "sft-0" and all("ray" in log[a] for a in ("sft-0", "sft-2", "sft-4", "sft2-2"))
    assert _strip(fanned.table) == _strip(one.table)
    assert fanned.correlations == one.correlations and fanned.findings == one.findings
    for a in log:  # the same files in every anchor folder
        names = sorted(p.relative_to(tmp_path / "ray").as_posix() for p in (tmp_path / "ray" / "anchors" / a).rglob("*"))
        assert names == sorted(p.relative_to(tmp_path / "one").as_posix()
                               for p in (tmp_path / "one" / "anchors" / a).rglob("*"))
    # the killed task's half-written folder was cleared when its retry wrote the same anchor
    assert not [p.name for p in (tmp_path / "ray" / "anchors").iterdir() if p.name.startswith(".")]
    again = _trajectory(setup, tmp_path / "ray", ray=True)  # a rerun: every anchor done, no task
    assert again.meta["ray"]["units"] == 0 and all(e.get("skipped") for e in again.meta["log"])


def test_a_killed_driver_loses_only_the_units_in_flight(cluster, setup, one_process, tmp_path):
    """A driver joined to the cluster is SIGKILLed once an anchor is written; the rerun measures only the rest and
    ends in the single-process result."""
    out = tmp_path / "ray"
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import pathlib, test_ray as T; "
            f"T._trajectory(pathlib.Path({str(setup)!r}), pathlib.Path({str(out)!r}), "
            f"ray={ray.get_runtime_context().gcs_address!r})")
    driver = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    t0 = time.time()
    while driver.poll() is None and time.time() - t0 < 150 and not list(out.glob("anchors/*/anchor.json")):
        time.sleep(0.05)
    driver.kill()
    driver.wait()
    finished = {p.parent.name for p in out.glob("anchors/*/anchor.json")}
    assert finished and len(finished) < 5, (finished, driver.stderr.read()[-2000:])
    res = _trajectory(setup, out, ray=True)
    log = {e["anchor"]: e for e in res.meta["log"]}
    assert all(log[a].get("skipped") for a in finished)
    assert res.meta["ray"]["units"] == len({"sft-0", "sft-2", "sft-4", "sft2-2"} - finished)
    assert _strip(res.table) == _strip(one_process.table) and res.findings == one_process.findings


def test_trajectory_adaptive_attacks_fan_out_per_anchor_and_behaviour_chunk(cluster, setup, tmp_path):
    """With adaptive attacks, one task per (anchor, method, chunk) attacks, then the anchor tasks judge: the rows equal
    one process's."""
    behaviours = [Prompt(HARMFUL[i], f"b{i}", meta={"target": "Sure, here is"}) for i in (2, 3, 4)]
    runs = {"sft": [(k, str(setup / "sft" / f"checkpoint-{k}")) for k in (0, 4)]}
    kw = dict(runs=runs, adaptive_behaviors=behaviours, adaptive_subset=3, gcg={"num_steps": 2, "search_width": 8,
                                                                                  "topk": 8})
    one = _trajectory(setup, tmp_path / "one", **kw)
    fanned = _trajectory(setup, tmp_path / "ray", ray={"chunk": 2}, **kw)
    assert fanned.meta["ray"]["units"] == 2 and fanned.meta["ray"]["attack_units"] == 4  # 2 anchors x ceil(3 / 2)
    assert [r["adaptive"]["gcg"]["n"] for r in fanned.table] == [3, 3]
    assert _strip(fanned.table) == _strip(one.table)
    for a in ("sft-0", "sft-4"):
        recs = [sorted(json.loads(line)["suffix_ids"] for line in
                       (tmp_path / d / "anchors" / a / "adaptive" / "gcg" / "records.jsonl").open()) for d in ("one", "ray")]
        assert recs[0] == recs[1]
    assert not (tmp_path / "ray" / ".work" / "sft-4").exists()  # the attack states removed once the anchor is written


def _replay(s, out, **kw):
    from pysafegeom.attacks.replay import replay

    return replay(s / "cases", str(s / "other"), out=out, max_new_tokens=6, batch_size=2, progress=False, **kw)


def test_replay_on_ray_equals_one_process_with_a_worker_killed(cluster, setup, tmp_path):
    one = _replay(setup, tmp_path / "one")
    fanned, killed = _kill_one_worker_during(lambda: _replay(setup, tmp_path / "ray", ray=True, shard_size=2), delay=0.2)
    assert killed is not None
    for f in ("results.json", "completions.json", "generations.json"):
        assert json.loads((tmp_path / "ray" / f).read_text()) == json.loads((tmp_path / "one" / f).read_text()), f
    assert fanned == one  # the counts too: 12 generated now, none resumed
    again = _replay(setup, tmp_path / "ray", ray=True, shard_size=2)  # every shard cached: no task, nothing generated
    assert again["n_generated"] == 0 and again["overall"] == one["overall"]
    # the target placed over the CPU and the disk in every task (each worker offloads into a folder of its own)
    placed_map = {"model.embed_tokens": "disk", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "disk"}
    _replay(setup, tmp_path / "placed", ray=True, shard_size=4, device_map=placed_map, offload_folder=tmp_path / "off")
    assert json.loads((tmp_path / "placed" / "results.json").read_text()) == \
        json.loads((tmp_path / "one" / "results.json").read_text())
    assert len(list((tmp_path / "off").glob("worker-*"))) >= 1


def test_transfer_on_ray_equals_one_process(cluster, setup, tmp_path):
    from pysafegeom.attacks.transfer import transfer

    models = [str(setup / "other"), str(setup / "sft" / "checkpoint-4")]
    kw = dict(max_new_tokens=4, batch_size=4, progress=False)
    one = transfer(setup / "cases", models, out=tmp_path / "one", **kw)
    fanned = transfer(setup / "cases", models, out=tmp_path / "ray", ray=True, shard_size=4, **kw)
    assert fanned["cells"] == one["cells"] and fanned["target_hashes"] == one["target_hashes"]
    for t in ("other", "checkpoint-4"):
        assert json.loads((tmp_path / "ray" / "replay" / t / "results.json").read_text()) == \
            json.loads((tmp_path / "one" / "replay" / t / "results.json").read_text())


def test_adaptive_attacks_on_ray_equal_one_process(cluster, setup, tmp_path):
    from pysafegeom.attacks.gcg import GCGConfig
    from pysafegeom.attacks.store import TestCaseStore
    from pysafegeom.pipelines.attack import adaptive

    behaviours = [Prompt(HARMFUL[i], f"b{i}", meta={"target": "Sure, here is"}) for i in range(3)]
    models = [str(setup / "other"), str(setup / "sft" / "checkpoint-4")]
    kw = dict(subset=3, methods=["gcg"], gcg=GCGConfig(num_steps=3, search_width=8, topk=8, seed=1),
              max_new_tokens=4, progress=False)
    one = adaptive(models, behaviours, out=tmp_path / "one", **kw)
    fanned = adaptive(models, behaviours, out=tmp_path / "ray", ray={"chunk": 2}, **kw)
    assert _strip(fanned) == _strip(one)
    for m in ("other", "checkpoint-4"):
        a, b = (sorted(TestCaseStore(tmp_path / d / m).records(), key=lambda r: r["id"]) for d in ("one", "ray"))
        assert [(r["id"], r["suffix_ids"], r["losses"], r["success"]) for r in a] == \
            [(r["id"], r["suffix_ids"], r["losses"], r["success"]) for r in b]


def test_run_units_reports_the_failing_unit_and_checks_options(cluster):
    with pytest.raises(UnitFailed, match=r"unit two failed: .*InvalidArgument.*ray workers") as exc:
        run_units([("one", {"ray": True}), ("two", {"ray": {"workers": 0}})], ray_options, RayOptions(),
                  desc="checks", progress=False)
    assert exc.value.unit == "two" and isinstance(exc.value.__cause__, InvalidArgument)
    assert run_units([], ray_options, RayOptions()) == {}
    with pytest.raises(InvalidArgument, match="same key"):
        run_units([("a", {}), ("a", {})], ray_options, RayOptions())
    assert ray_options("auto").address == "auto" and ray_options(True).address is None
    assert ray_options({"num_gpus": 1}).num_gpus == 1 and ray_options(None) is None
    for bad, msg in (({"num_gpus": -1}, "num_gpus"), ({"gpus": 1}, "unknown ray option"), (3, "ray must be"),
                     ({"num_cpus": 0}, "some resource"), ({"max_retries": -1}, "max_retries"), ({"chunk": 0}, "chunk")):
        with pytest.raises((InvalidArgument, TypeError), match=msg):
            ray_options(bad)


def test_loaded_models_are_refused_on_ray(setup, tmp_path):
    from pysafegeom.attacks.replay import ReplayError, replay
    from pysafegeom.models import load_model

    model, tok = load_model(str(setup / "other"))
    with pytest.raises(ReplayError, match="load_model spec"):
        replay(setup / "cases", model, tok, out=tmp_path / "r", ray=True)


def test_no_ray_import_without_ray_and_a_clear_line_without_ray_installed(setup, tmp_path):
    """A single-process replay and the CLI's parser leave Ray unimported; with Ray missing, --ray says how to get it."""
    code = (
        "import sys, pysafegeom\n"
        "from pysafegeom.cli import build_parser\n"
        "from pysafegeom.attacks.replay import replay\n"
        "build_parser().parse_args(['trajectory', '--run', 'a=x', '--out', 'o'])\n"
        f"replay({str(setup / 'cases')!r}, {str(setup / 'other')!r}, out={str(tmp_path / 'r')!r}, max_new_tokens=2, "
        "progress=False)\n"
        "import pysafegeom.info as I; assert I.collect()['versions']['ray'] == __import__('importlib.metadata').metadata.version('ray')\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
        "sys.modules['ray'] = None\n"
        "from pysafegeom.scale import run_units, RayOptions\n"
        "try:\n"
        "    run_units([('a', {})], print, RayOptions())\n"
        "except ImportError as e:\n"
        "    print('MSG', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "MSG --ray / ray= fans the work out on Ray, which is not installed: pip install 'pysafegeom[ray]'" in out.stdout


def test_cli_ray_flags(setup, tmp_path, capsys):
    from pysafegeom.cli import build_parser
    from pysafegeom.cli_args import ray_from_args

    p = build_parser()
    for argv in (["trajectory", "--run", "a=x", "--out", "o"], ["attack", "replay", "--cases", "c", "--model", "m",
                                                                 "--out", "o"],
                 ["transfer", "--cases", "c", "--models", "m", "--out", "o"],
                 ["attack", "adaptive", "--models", "m", "--behaviors", "b", "--out", "o"]):
        assert ray_from_args(p.parse_args(argv)) is None
        opts = ray_from_args(p.parse_args([*argv, "--ray", "--ray-gpus", "1", "--ray-cpus", "2", "--ray-chunk", "5"]))
        assert opts == RayOptions(address=None, num_gpus=1.0, num_cpus=2.0, chunk=5)
        assert ray_from_args(p.parse_args([*argv, "--ray", "10.0.0.1:6379"])).address == "10.0.0.1:6379"
        with pytest.raises(InvalidArgument, match="give --ray too"):
            ray_from_args(p.parse_args([*argv, "--ray-gpus", "1"]))
        with pytest.raises(SystemExit):
            p.parse_args([*argv, "--ray", "--ray-gpus", "-1"])
    capsys.readouterr()
