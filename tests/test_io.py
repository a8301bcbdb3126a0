"""Output-folder safety and atomic saves (pysafegeom/_io.py): the marker rule, the swap cut at every step
(by an exception, and by SIGKILL / SIGTERM in a child process), recovery on the next open, file modes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pysafegeom import _io
from pysafegeom._io import (
    MARKER, atomic_dir, atomic_write_text, check_output_path, mark_dir, read_marker, recover, recover_all,
)
from pysafegeom.errors import InvalidArgument, OutputExists

ROOT = Path(__file__).resolve().parents[1]
FILES = ("a.txt", "b.txt", "sub/c.txt")


def _save(target, version, **kw):
    with atomic_dir(target, **kw) as tmp:
        for f in FILES:
            (tmp / f).parent.mkdir(exist_ok=True)
            (tmp / f).write_text(version)
    return target


def _version(target) -> str:
    """The version held by a result folder, asserting that it is complete (every file, all one version)."""
    got = {(target / f).read_text() for f in FILES}
    assert len(got) == 1, f"{target} mixes versions {got}"
    assert read_marker(target) is not None
    return got.pop()


def _leftovers(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if ".tmp-" in n or ".old-" in n)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _exchange_supported(tmp_path) -> bool:
    a, b = tmp_path / "xa", tmp_path / "xb"
    a.mkdir()
    b.mkdir()
    try:
        return _io._exchange(a, b)
    finally:
        a.rmdir()
        b.rmdir()


# ---------------------------------------------------------------- the marker rule

def test_new_folder_gets_the_marker(tmp_path):
    out = _save(tmp_path / "r", "1", content="analysis")
    m = read_marker(out)
    assert m["written_by"] == "pysafegeom" and m["content"] == "analysis"
    from pysafegeom import __version__

    assert m["version"] == __version__ and m["date"][:2] == "20"
    assert _leftovers(tmp_path) == []


def test_user_folder_is_refused_and_untouched(tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputExists, match=str(user)):
        check_output_path(user)
    with pytest.raises(OutputExists, match="not written by pysafegeom"):
        check_output_path(user, content="analysis")
    assert os.listdir(user) == ["thesis.tex"] and (user / "thesis.tex").read_text() == "years of work"
    # a marker file that is not ours (other JSON, garbage) does not make it ours
    (user / MARKER).write_text(json.dumps({"written_by": "someone else"}))
    with pytest.raises(OutputExists):
        check_output_path(user)
    (user / MARKER).write_text("{not json")
    with pytest.raises(OutputExists):
        check_output_path(user)


def test_own_folder_is_replaced_and_overwrite_replaces_a_user_folder(tmp_path):
    out = _save(tmp_path / "r", "old", content="analysis")
    assert check_output_path(out, content="analysis") == out
    _save(out, "new", content="analysis")
    assert _version(out) == "new"
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes").write_text("x")
    assert check_output_path(user, overwrite=True) == user
    _save(user, "new", content="analysis")
    assert _version(user) == "new" and not (user / "notes").exists()
    assert _leftovers(tmp_path) == []


def test_own_folder_of_another_content_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    mark_dir(run, "training")
    (run / "checkpoint-10").mkdir()
    with pytest.raises(OutputExists, match="training"):
        check_output_path(run, content="analysis")
    assert check_output_path(run, content="training") == run
    assert check_output_path(run) == run  # no content asked: any folder of ours
    assert check_output_path(run, overwrite=True, content="analysis") == run


def test_missing_and_empty_paths_are_fine(tmp_path):
    assert check_output_path(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    (tmp_path / "empty").mkdir()
    assert check_output_path(tmp_path / "empty") == tmp_path / "empty"


def test_a_file_where_a_folder_is_expected(tmp_path):
    f = tmp_path / "results.json"
    f.write_text("{}")
    for overwrite in (False, True):
        with pytest.raises(OutputExists, match="is a file, not a folder"):
            check_output_path(f, overwrite=overwrite)
    with pytest.raises(OutputExists, match="cannot be created inside it"):
        check_output_path(f / "sub")
    assert f.read_text() == "{}"


def test_file_outputs(tmp_path):
    f = tmp_path / "cases.jsonl"
    assert check_output_path(f, kind="file") == f
    f.write_text("mine")
    with pytest.raises(OutputExists, match="overwrite=True"):
        check_output_path(f, kind="file")
    assert check_output_path(f, overwrite=True, kind="file") == f
    with pytest.raises(OutputExists, match="is a folder"):
        check_output_path(tmp_path, overwrite=True, kind="file")
    with pytest.raises(InvalidArgument):
        check_output_path(f, kind="folder")
    with pytest.raises(InvalidArgument):
        check_output_path("  ")
    assert f.read_text() == "mine"


def test_symlink_needs_overwrite_and_its_target_survives(tmp_path):
    real = _save(tmp_path / "real", "1")
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(OutputExists, match="symbolic link"):
        check_output_path(link)
    check_output_path(link, overwrite=True)
    _save(link, "2")
    assert not link.is_symlink() and _version(link) == "2" and _version(real) == "1"


# ---------------------------------------------------------------- modes

def test_modes_are_0644_and_0755_whatever_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        import tempfile

        with atomic_dir(tmp_path / "r") as tmp:
            fd, name = tempfile.mkstemp(dir=tmp)  # 0600, as tempfile makes them
            os.close(fd)
            (tmp / "d").mkdir()
            (tmp / "d" / "f").write_text("x")
        f = atomic_write_text(tmp_path / "report.html", "<p>")
    finally:
        os.umask(old)
    out = tmp_path / "r"
    assert out.stat().st_mode & 0o777 == 0o755 and (out / "d").stat().st_mode & 0o777 == 0o755
    for p in [out / MARKER, out / "d" / "f", out / Path(name).name, f]:
        assert p.stat().st_mode & 0o777 == 0o644, p


# ---------------------------------------------------------------- an exception at each step

class Cut(Exception):
    pass


def test_exception_in_the_body_leaves_the_old_result(tmp_path):
    out = _save(tmp_path / "r", "old")
    with pytest.raises(Cut):
        with atomic_dir(out) as tmp:
            (tmp / "a.txt").write_text("new")
            raise Cut
    assert _version(out) == "old" and _leftovers(tmp_path) == []


def test_exchange_is_one_step(tmp_path, monkeypatch):
    if not _exchange_supported(tmp_path):
        pytest.skip("no renameat2(RENAME_EXCHANGE) on this system / file system")
    out = _save(tmp_path / "r", "old")
    renames = []
    real = _io._rename
    monkeypatch.setattr(_io, "_rename", lambda a, b: (renames.append((a, b)), real(a, b)))
    _save(out, "new")
    assert renames == [] and _version(out) == "new" and _leftovers(tmp_path) == []


@pytest.mark.parametrize("when", ["before", "after"])
def test_exchange_cut(tmp_path, monkeypatch, when):
    out = _save(tmp_path / "r", "old")
    real = _io._exchange

    def cut(a, b):
        if when == "after":
            if not real(a, b):  # no exchange here: do what it would have done
                os.rename(b, str(a) + ".x")
                os.rename(a, b)
                os.rename(str(a) + ".x", a)
        raise Cut

    monkeypatch.setattr(_io, "_exchange", cut)
    with pytest.raises(Cut):
        _save(out, "new")
    assert _version(out) == ("old" if when == "before" else "new")
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("cut_at", [1, 2, 3])
def test_two_rename_fallback_cut(tmp_path, monkeypatch, cut_at):
    """Without the exchange: cut before the first rename, between the two, and after the second."""
    out = _save(tmp_path / "r", "old")
    monkeypatch.setattr(_io, "_exchange", lambda a, b: False)
    calls = []
    real = _io._rename

    def rename(a, b):
        calls.append(1)
        if len(calls) == cut_at:
            raise Cut
        real(a, b)
        if len(calls) == 2 and cut_at == 3:
            raise Cut  # after the second rename, before the old copy is deleted

    monkeypatch.setattr(_io, "_rename", rename)
    with pytest.raises(Cut):
        _save(out, "new")
    assert _version(out) == ("new" if cut_at == 3 else "old")
    assert _leftovers(tmp_path) == []


def test_fallback_without_cut(tmp_path, monkeypatch):
    monkeypatch.setattr(_io, "_exchange", lambda a, b: False)
    out = _save(_save(tmp_path / "r", "old"), "new")
    assert _version(out) == "new" and _leftovers(tmp_path) == []


def test_failed_delete_of_the_old_copy_keeps_the_new_result(tmp_path, monkeypatch):
    out = _save(tmp_path / "r", "old")

    def boom(p):
        raise PermissionError(13, "Permission denied", str(p))

    monkeypatch.setattr(_io, "_remove_tree", boom)
    with pytest.warns(RuntimeWarning, match="could not remove"):
        _save(out, "new")
    assert _version(out) == "new"


def test_replace_false_keeps_the_first(tmp_path):
    out = _save(tmp_path / "r", "first")
    _save(out, "second", replace=False)
    assert _version(out) == "first" and _leftovers(tmp_path) == []


# ---------------------------------------------------------------- recovery on the next open

def _fake_result(folder: Path, version: str) -> Path:
    for f in FILES:
        (folder / f).parent.mkdir(parents=True, exist_ok=True)
        (folder / f).write_text(version)
    (folder / MARKER).write_text(_io._marker_text("output"))
    return folder


def test_stranded_old_is_restored(tmp_path):
    pid = _dead_pid()
    _fake_result(tmp_path / f".r.old-{pid}-{_io._host_tag()}", "old")
    _fake_result(tmp_path / f".r.tmp-{pid}-{_io._host_tag()}-abcd1234", "new")
    done = recover(tmp_path / "r")
    assert _version(tmp_path / "r") == "old" and _leftovers(tmp_path) == [] and len(done) == 2


def test_legacy_old_name_is_restored(tmp_path):
    _fake_result(tmp_path / f".r.old-{_dead_pid()}", "old")  # the name earlier versions used
    check_output_path(tmp_path / "r")
    assert _version(tmp_path / "r") == "old"


def test_stale_old_beside_a_present_result_is_removed(tmp_path):
    _save(tmp_path / "r", "new")
    _fake_result(tmp_path / f".r.old-{_dead_pid()}-{_io._host_tag()}", "old")
    recover(tmp_path / "r")
    assert _version(tmp_path / "r") == "new" and _leftovers(tmp_path) == []


def test_stale_temps_of_dead_processes_only(tmp_path):
    host = _io._host_tag()
    dead = tmp_path / f".r.tmp-{_dead_pid()}-{host}-00000000"
    live = tmp_path / f".r.tmp-{os.getpid()}-{host}-11111111"
    other_host = tmp_path / f".r.tmp-{_dead_pid()}-ffffffff-22222222"
    unknown = tmp_path / ".r.tmp-k2j_xq9a"  # an old random-named temp: not ours to judge
    for d in (dead, live, other_host, unknown):
        d.mkdir()
    (tmp_path / f".report.html.tmp-{_dead_pid()}-{host}-33333333").write_text("half")  # a file temp
    if _io._host_tag() == "ffffffff":  # pragma: no cover
        pytest.skip("this host hashes to the made-up tag")
    recover(tmp_path / "r")
    recover(tmp_path / "report.html")
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in (live, other_host, unknown))


def test_recover_all_and_atomic_dir_recover(tmp_path):
    host = _io._host_tag()
    _fake_result(tmp_path / f".checkpoint-4.old-{_dead_pid()}-{host}", "4")
    (tmp_path / f".checkpoint-8.tmp-{_dead_pid()}-{host}-abcdef00").mkdir()
    recover_all(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-4"] and _version(tmp_path / "checkpoint-4") == "4"
    _fake_result(tmp_path / f".r.old-{_dead_pid()}-{host}", "old")
    with atomic_dir(tmp_path / "r") as tmp:  # recovers first, then replaces the restored result
        assert _version(tmp_path / "r") == "old"
        (tmp / "a.txt").write_text("new")
    assert (tmp_path / "r" / "a.txt").read_text() == "new"


def test_load_result_recovers(tmp_path):
    from pysafegeom.pipelines.analyze import load_result

    _fake_result(tmp_path / f".r.old-{_dead_pid()}-{_io._host_tag()}", "old")
    with pytest.raises(FileNotFoundError, match="result.json"):
        load_result(tmp_path / "r")  # restored first (it is not an analysis folder, so it still fails)
    assert _version(tmp_path / "r") == "old"


# ---------------------------------------------------------------- a real kill mid-save

CHILD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from pysafegeom import _io

    target, point = Path(sys.argv[1]), sys.argv[2]

    def hold():
        print("ready", flush=True)
        time.sleep(60)

    if point == "between":
        _io._exchange = lambda a, b: False
        real = _io._rename
        n = []
        def rename(a, b):
            real(a, b)
            n.append(1)
            if len(n) == 1:
                hold()
        _io._rename = rename
    if point == "after":
        real_discard = _io._discard
        held = []
        def discard(p):
            if not held:
                held.append(1)
                hold()
            real_discard(p)
        _io._discard = discard
    with _io.atomic_dir(target) as tmp:
        for f in %r:
            (tmp / f).parent.mkdir(exist_ok=True)
            (tmp / f).write_text("new")
        if point == "body":
            hold()
    print("finished", flush=True)
""" % (FILES,))


@pytest.mark.skipif(os.name != "posix", reason="signals")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
@pytest.mark.parametrize("point", ["body", "between", "after"])
def test_killed_mid_save(tmp_path, sig, point):
    out = _save(tmp_path / "r", "old")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(out), point], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "ready"
        child.send_signal(sig)
        rc = child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert rc == -sig  # a SIGTERM still ends the process as a SIGTERM
    expect = "new" if point == "after" else "old"
    if sig == signal.SIGTERM:  # the child cleaned up before it died
        assert _version(out) == expect and _leftovers(tmp_path) == []
    else:  # SIGKILL: nothing ran; the next open repairs it
        if point == "between":
            assert not out.exists()
        check_output_path(out)
        assert _version(out) == expect and _leftovers(tmp_path) == []


# ---------------------------------------------------------------- the writers

def test_analysis_save_refuses_a_user_folder_before_writing(tmp_path):
    from pysafegeom.pipelines.analyze import AnalysisResult

    user = tmp_path / "mine"
    user.mkdir()
    (user / "data.csv").write_text("1,2")
    with pytest.raises(OutputExists, match="mine"):
        AnalysisResult.save(object(), user)  # refused before the result itself is read
    assert os.listdir(user) == ["data.csv"]


def test_export_orthogonalized_refuses_a_user_folder(tmp_path):
    import torch

    from pysafegeom.interventions.hooks import export_orthogonalized
    from pysafegeom.models.tiny import tiny_model

    model = tiny_model("llama", n_layers=1, d_model=16, vocab_size=64)
    user = tmp_path / "mine"
    user.mkdir()
    (user / "weights.bin").write_text("mine")
    d = torch.randn(16)
    with pytest.raises(OutputExists):
        export_orthogonalized(model, None, d, user)
    assert os.listdir(user) == ["weights.bin"]
    out = export_orthogonalized(model, None, d, tmp_path / "edited")
    assert read_marker(out)["content"] == "model" and (out / "config.json").is_file()
    export_orthogonalized(model, None, d, out)  # its own folder: replaced
    export_orthogonalized(model, None, d, user, overwrite=True)
    assert not (user / "weights.bin").exists() and (user / "config.json").is_file()


def test_training_folder_rule(tmp_path):
    from pysafegeom.train.sft import claim_out_dir

    user = tmp_path / "mine"
    user.mkdir()
    (user / "paper.pdf").write_text("x")
    with pytest.raises(OutputExists):
        claim_out_dir(user)
    assert os.listdir(user) == ["paper.pdf"]
    assert claim_out_dir(user, overwrite=True) == user and read_marker(user)["content"] == "training"
    fresh = claim_out_dir(tmp_path / "run")
    assert read_marker(fresh)["content"] == "training"
    assert claim_out_dir(fresh) == fresh  # resuming into its own folder
    legacy = tmp_path / "legacy"  # a run written before the marker existed
    (legacy / "checkpoint-2").mkdir(parents=True)
    (legacy / "checkpoint-2" / "trainer_state.pt").write_bytes(b"")
    assert claim_out_dir(legacy) == legacy
    analysis = _save(tmp_path / "analysis", "1", content="analysis")
    with pytest.raises(OutputExists, match="analysis"):
        claim_out_dir(analysis)
    checked = claim_out_dir(tmp_path / "later", create=False)
    assert not checked.exists()


def test_cli_checks_out_before_loading_the_model(tmp_path, capsys):
    from pysafegeom.cli import main

    user = tmp_path / "mine"
    user.mkdir()
    (user / "keep.txt").write_text("x")
    rc = main(["analyze", "--model", str(tmp_path / "no-such-model"), "--out", str(user)])
    err = capsys.readouterr().err
    assert rc == 2 and "mine" in err and "--overwrite" in err and "no-such-model" not in err
    assert os.listdir(user) == ["keep.txt"]
    for cmd in (["train", "--out", str(user)], ["demo", "--out", str(user)]):
        rc = main(cmd + ["--model", str(tmp_path / "no-such-model")])
        err = capsys.readouterr().err
        assert rc == 2 and "mine" in err and "no-such-model" not in err, cmd
    # with --overwrite the path passes and the command goes on to the (missing) model
    rc = main(["analyze", "--model", str(tmp_path / "no-such-model"), "--out", str(user), "--overwrite"])
    assert rc == 2 and "no-such-model" in capsys.readouterr().err
    assert os.listdir(user) == ["keep.txt"]


def test_export_adapter_refuses_a_user_folder(tmp_path):
    import torch
    from safetensors.torch import save_file

    from pysafegeom.train.sft import export_adapter

    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    (ckpt / "adapter_config.json").write_text(json.dumps({"r": 8, "base_model_name_or_path": "x"}))
    save_file({"w": torch.ones(2, 2)}, str(ckpt / "adapter_model.safetensors"))
    shipped = tmp_path / "anchor"
    shipped.mkdir()
    (shipped / "RECIPE.md").write_text("how it was made")
    with pytest.raises(OutputExists, match="anchor"):
        export_adapter(ckpt, shipped)
    assert os.listdir(shipped) == ["RECIPE.md"]
    export_adapter(ckpt, shipped, overwrite=True)  # writes the adapter files in, keeps the rest
    assert sorted(os.listdir(shipped)) == ["RECIPE.md", "adapter_config.json", "adapter_model.safetensors"]
    assert sorted(os.listdir(export_adapter(ckpt, tmp_path / "new"))) == ["adapter_config.json", "adapter_model.safetensors"]


def test_an_unwritable_output_folder_is_refused_before_any_work(tok, monkeypatch):
    """/proc cannot hold a new folder (even for root): analyze says so before the first forward pass."""
    from pysafegeom.errors import OutputNotWritable
    from pysafegeom.models import tiny_model
    from pysafegeom.pipelines import analyze as A

    with pytest.raises(OutputNotWritable, match="/proc"):
        check_output_path("/proc/pysafegeom-out/result", False, "dir", content="analysis")
    monkeypatch.setattr(A, "capture", lambda *a, **k: pytest.fail("capture ran before the output was checked"))
    model = tiny_model("llama", tokenizer=tok, n_layers=1, d_model=32)
    with pytest.raises(PermissionError, match="not writable"):
        A.analyze(model, ["a b c", "d e f", "g h i"], ["j k l", "m n o", "p q r"], ["s t u"], tokenizer=tok,
                  out="/proc/pysafegeom-out", progress=False)
