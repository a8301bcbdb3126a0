"""The command line: a bad option is one line naming it (argparse's exit 2, no usage block); an error in a
command is one line, the message, with no traceback (exit 2), and ``--debug`` shows the traceback."""

from __future__ import annotations

import pytest

from pysafegeom.cli import main

OPTION_CASES = [
    ("analyze --n-val -3", ["analyze", "--n-val", "-3"], "--n-val", ">= 1"),
    ("analyze --n-val abc", ["analyze", "--n-val", "abc"], "--n-val", "not an integer"),
    ("analyze --layer-stride 0", ["analyze", "--layer-stride", "0"], "--layer-stride"),
    ("analyze --kl-threshold nan", ["analyze", "--kl-threshold", "nan"], "--kl-threshold", "finite"),
    ("analyze --kl-threshold -1", ["analyze", "--kl-threshold", "-1"], "--kl-threshold"),
    ("analyze --batch-size 0", ["analyze", "--batch-size", "0"], "--batch-size"),
    ("analyze --max-new-tokens 0", ["analyze", "--max-new-tokens", "0"], "--max-new-tokens"),
    ("analyze --device gpu", ["analyze", "--device", "gpu"], "--device", "'cuda'"),
    ("analyze --dtype int8", ["analyze", "--dtype", "int8"], "--dtype", "float32"),
    ("train --save-at 1,abc", ["train", "--save-at", "1,abc"], "--save-at", "'abc' is not an integer"),
    ("train --save-at -1", ["train", "--save-at", "-1"], "--save-at"),
    ("train --lr 1e4", ["train", "--lr", "1e4"], "--lr"),
    ("train --steps 0", ["train", "--steps", "0"], "--steps"),
    ("train --warmup-steps -1", ["train", "--warmup-steps", "-1"], "--warmup-steps"),
    ("train --lora-alpha 0", ["train", "--lora-alpha", "0"], "--lora-alpha"),
    ("demo --n-controls 0", ["demo", "--n-controls", "0"], "--n-controls"),
    ("demo --n-behaviour -1", ["demo", "--n-behaviour", "-1"], "--n-behaviour"),
]


@pytest.mark.parametrize("case", OPTION_CASES, ids=[c[0] for c in OPTION_CASES])
def test_bad_option_is_one_line_naming_it(tmp_path, capsys, case):
    _, argv, *names = case
    if argv[0] in ("analyze", "train"):
        argv = argv + ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for n in names:
        assert n in err, f"{n!r} not in {err!r}"
    assert not (tmp_path / "out").exists()


COMMAND_CASES = [
    ("analyze a missing model", ["analyze", "--model", "{tmp}/no-model"], "no-model", "not found"),
    ("train a missing model", ["train", "--model", "{tmp}/no-model"], "no-model", "not found"),
    ("analyze a missing prompt file", ["analyze", "--model", "{tmp}/no-model", "--harmful", "{tmp}/h.csv"], "error"),
]


@pytest.mark.parametrize("case", COMMAND_CASES, ids=[c[0] for c in COMMAND_CASES])
def test_command_error_is_one_line_without_traceback(tmp_path, capsys, case):
    _, argv, *names = case
    argv = [a.format(tmp=tmp_path) for a in argv] + ["--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"pysafegeom {argv[0]}: error: ")
    for n in names:
        assert n in err


def test_debug_shows_the_traceback(tmp_path):
    from pysafegeom.errors import MissingFile

    argv = ["analyze", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "out")]
    with pytest.raises(MissingFile):
        main(["--debug"] + argv)
    with pytest.raises(MissingFile):
        main(argv + ["--debug"])  # after the command too
