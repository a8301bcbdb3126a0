"""Bad inputs to ``load_model`` end in a clear pysafegeom error that names the argument or the file and what is
wrong with it (checked before transformers reads anything)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pysafegeom.errors import InputFileError, InvalidArgument, InvalidType, MissingFile
from pysafegeom.models import load_model, tiny_model
from validate_helpers import assert_clear


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny model folder with a word-level tokenizer (no real vocabulary needed)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(60)} | {"<unk>": 60, "<s>": 61, "</s>": 62}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    path = tmp_path_factory.mktemp("lm") / "good"
    tiny_model("qwen2", n_layers=1, d_model=16, vocab_size=63).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _variant(folder, tmp_path, name, edit):
    dst = tmp_path / name
    shutil.copytree(folder, dst)
    edit(dst)
    return dst


def _truncate(f, keep=0.5):
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])


def _adapter(dst, cfg_text):
    for f in list(dst.iterdir()):
        f.unlink()
    (dst / "adapter_config.json").write_text(cfg_text)


FOLDER_CASES = [
    ("config-only folder", lambda d: [f.unlink() for f in d.iterdir() if f.name != "config.json"], MissingFile,
     "no weights"),
    ("no tokenizer", lambda d: [f.unlink() for f in d.iterdir() if "token" in f.name], MissingFile, "no tokenizer"),
    ("truncated safetensors", lambda d: _truncate(d / "model.safetensors"), InputFileError, "model.safetensors",
     "truncated"),
    ("safetensors of 3 bytes", lambda d: (d / "model.safetensors").write_bytes(b"abc"), InputFileError,
     "model.safetensors"),
    ("empty config.json", lambda d: (d / "config.json").write_text(""), InputFileError, "config.json", "empty"),
    ("config.json not a model config", lambda d: (d / "config.json").write_text("{}"), InputFileError, "config.json",
     "model_type"),
    ("empty adapter_config.json", lambda d: _adapter(d, ""), InputFileError, "adapter_config.json", "empty"),
    ("adapter_config.json cut short", lambda d: _adapter(d, '{"base_model_name_or_path": "sm'), InputFileError,
     "adapter_config.json", "not valid JSON"),
    ("adapter without a base", lambda d: _adapter(d, '{"r": 8}'), InputFileError, "base_model_name_or_path"),
    ("adapter config a list", lambda d: _adapter(d, "[]"), InputFileError, "adapter_config.json"),
    ("adapter without weights", lambda d: _adapter(d, '{"base_model_name_or_path": "smollm2-135m-instruct"}'),
     MissingFile, "adapter_model"),
]


@pytest.mark.parametrize("case", FOLDER_CASES, ids=[c[0] for c in FOLDER_CASES])
def test_bad_model_folder_names_the_file(folder, tmp_path, case):
    name, edit, exc, *names = case
    bad = _variant(folder, tmp_path, "m", edit)
    assert_clear(lambda: load_model(bad, device="cpu"), exc, str(bad), *names)


def test_garbage_gguf_is_named(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"this is not a gguf file at all" * 10)
    assert_clear(lambda: load_model(f, device="cpu"), InputFileError, str(f), "not a GGUF file")


def test_truncated_gguf_header_is_named(tmp_path):
    f = tmp_path / "cut.gguf"
    f.write_bytes(b"GGU")
    assert_clear(lambda: load_model(f, device="cpu"), InputFileError, str(f), "GGUF")


def test_a_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 16)
    assert_clear(lambda: load_model(f, device="cpu"), MissingFile, str(f), ".gguf")


SPEC_CASES = [
    ("a loaded model", lambda: tiny_model("llama", n_layers=1, d_model=16, vocab_size=32), InvalidType, "spec",
     "already a loaded model"),
    ("None", lambda: None, InvalidType, "spec"),
    ("an empty string", lambda: "  ", InvalidArgument, "spec"),
    ("a number", lambda: 135, InvalidType, "spec"),
]


@pytest.mark.parametrize("case", SPEC_CASES, ids=[c[0] for c in SPEC_CASES])
def test_bad_spec(case):
    _, make, exc, *names = case
    spec = make()
    assert_clear(lambda: load_model(spec, device="cpu"), exc, *names)


OPTION_CASES = [
    ("device gpu", dict(device="gpu"), InvalidArgument, "device", "'cuda'"),
    ("device an int", dict(device=0), InvalidType, "device", "cuda:0"),
    ("device unknown", dict(device="tpu"), InvalidArgument, "device"),
    ("dtype int8 name", dict(dtype="int8"), InvalidArgument, "dtype", "unknown dtype"),
    ("dtype an integer torch dtype", dict(dtype=torch.int8), InvalidArgument, "dtype"),
    ("dtype a number", dict(dtype=16), InvalidType, "dtype"),
]


@pytest.mark.parametrize("case", OPTION_CASES, ids=[c[0] for c in OPTION_CASES])
def test_bad_device_and_dtype(folder, case):
    _, kw, exc, *names = case
    kw = {"device": "cpu", **kw}
    assert_clear(lambda: load_model(folder, **kw), exc, *names)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda(folder):
    assert_clear(lambda: load_model(folder, device="cuda"), InvalidArgument, "device", "CUDA is not available")


def test_dtype_spellings_and_a_good_folder_load(folder):
    m, t = load_model(folder, device="cpu", dtype="torch.float32")
    assert next(m.parameters()).dtype == torch.float32
    m, t = load_model(folder, device="cpu", dtype="BF16")
    assert next(m.parameters()).dtype == torch.bfloat16
    assert json.loads((folder / "config.json").read_text())["model_type"] == "qwen2"
