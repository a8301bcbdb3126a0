"""Bad inputs to ``load_result`` and ``drift`` end in a clear pysafegeom error naming the file and what is
wrong: a truncated or edited result.json, missing, truncated or altered tensors (the sha256 recorded at save),
carriers of the wrong width, NaNs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from pysafegeom.errors import InputFileError, InvalidArgument, InvalidType, MissingFile
from pysafegeom.pipelines.analyze import AnalysisResult, drift, load_result
from pysafegeom.protocol.carriers import Carriers
from pysafegeom.protocol.selection import Selection
from validate_helpers import assert_clear

L, P, D, K = 3, 2, 8, 2


def _result(seed=0) -> AnalysisResult:
    g = torch.Generator().manual_seed(seed)
    H, R = torch.randn(L, D, generator=g), torch.randn(L, P, D, generator=g)
    car = Carriers(list(range(L)), ["eoi-2", "eoi-1"], H, R, "filtered", "", {"harmful": 4})
    sel = Selection([], 0.0, 0.0, 0.1, 0.2, "none", None, None, 0, 0)
    q = torch.linalg.qr(torch.randn(D, K, generator=g))[0]
    return AnalysisResult({"model": f"tiny-{seed}", "d_model": D, "n_layers": L}, {}, car, sel,
                          {"k": K, "coupling": {"mid_band_mean": 0.1}, "reference": {"layer": 1}}, {}, q, q.clone())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("res") / "good"
    _result().save(out, report=False)
    return out


def _json(d, edit):
    f = d / "result.json"
    data = json.loads(f.read_text())
    edit(data)
    f.write_text(json.dumps(data))


def _tensors(d, edit):
    """Rewrite the tensors (and drop the checksum, so the shape and NaN checks are what is tested)."""
    f = d / "carriers.safetensors"
    t = load_file(str(f))
    edit(t)
    save_file(t, str(f))
    _json(d, lambda data: data.pop("tensors_sha256"))


def _flip_byte(f):
    data = bytearray(f.read_bytes())
    data[-5] ^= 0x40
    f.write_bytes(bytes(data))


def _cut(f, keep=0.6):
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])


FOLDER_CASES = [
    ("no result.json", lambda d: (d / "result.json").unlink(), MissingFile, "result.json"),
    ("truncated result.json", lambda d: _cut(d / "result.json"), InputFileError, "result.json", "not valid JSON"),
    ("empty result.json", lambda d: (d / "result.json").write_text(""), InputFileError, "result.json", "empty"),
    ("result.json a list", lambda d: (d / "result.json").write_text("[1, 2]"), InputFileError, "result.json"),
    ("another version", lambda d: _json(d, lambda x: x.update(version=99)), InputFileError, "version"),
    ("no carriers section", lambda d: _json(d, lambda x: x.pop("carriers")), InputFileError, "carriers"),
    ("no tensors file", lambda d: (d / "carriers.safetensors").unlink(), MissingFile, "carriers.safetensors"),
    ("truncated tensors", lambda d: _cut(d / "carriers.safetensors"), InputFileError, "carriers.safetensors",
     "truncated"),
    ("a flipped byte", lambda d: _flip_byte(d / "carriers.safetensors"), InputFileError, "carriers.safetensors",
     "sha256"),
    ("carriers of another width", lambda d: _tensors(d, lambda t: t.update(H=torch.randn(L, D + 1))), InputFileError,
     "H has shape", str(D)),
    ("R of another layer count", lambda d: _tensors(d, lambda t: t.update(R=torch.randn(L + 1, P, D))),
     InputFileError, "R has shape"),
    ("NaN in H", lambda d: _tensors(d, lambda t: t["H"].__setitem__((1, 0), float("nan"))), InputFileError, "NaN",
     "layers [1]"),
    ("a tensor missing", lambda d: _tensors(d, lambda t: t.pop("Q_R")), InputFileError, "Q_R"),
    ("Q of another width", lambda d: _tensors(d, lambda t: t.update(Q_H=torch.randn(D + 2, K))), InputFileError,
     "Q_H"),
]


@pytest.mark.parametrize("case", FOLDER_CASES, ids=[c[0] for c in FOLDER_CASES])
def test_bad_result_folder_names_the_file(saved, tmp_path, case):
    _, edit, exc, *names = case
    bad = tmp_path / "bad"
    shutil.copytree(saved, bad)
    edit(bad)
    assert_clear(lambda: load_result(bad), exc, str(bad), *names)


@pytest.mark.parametrize("path, exc", [(None, InvalidType), (3, InvalidType)], ids=["None", "a number"])
def test_bad_path_type(path, exc):
    assert_clear(lambda: load_result(path), exc, "path")


def test_missing_folder(tmp_path):
    assert_clear(lambda: load_result(tmp_path / "nope"), MissingFile, "nope", "does not exist")


def test_round_trip_and_result_json_path(saved):
    a = load_result(saved)
    b = load_result(saved / "result.json")  # the file itself is fine too
    assert torch.equal(a.carriers.H, b.carriers.H) and torch.equal(a.carriers.H, _result().carriers.H)
    assert len(json.loads((saved / "result.json").read_text())["tensors_sha256"]) == 64


def test_drift_checks(saved):
    a, b = _result(0), _result(1)
    assert drift(a, b)["layers"] == list(range(L))
    assert_clear(lambda: drift(a, None), InvalidType, "b")
    assert_clear(lambda: drift(str(saved), b), InvalidType, "a", "load_result")
    nan = _result(2)
    nan.carriers.R[2, 1, 3] = float("nan")
    assert_clear(lambda: drift(a, nan), InvalidArgument, "NaN", "layers [2]", "R")
    wide = _result(3)
    wide.carriers.H = torch.randn(L, D + 1)
    assert_clear(lambda: drift(a, wide), InvalidArgument, "not comparable")
