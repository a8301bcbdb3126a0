"""Model loading (offline only), the GGUF cache, and the architecture adapter."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from pysafegeom.models import (
    ModelAdapter,
    ModelNotFound,
    UnsupportedArchitecture,
    load_model,
    resolve,
    tiny_model,
)
from pysafegeom.models.tiny import ARCHS


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_finds_every_part(arch):
    model = tiny_model(arch, n_layers=3, d_model=32)
    ad = ModelAdapter(model)
    assert ad.n_layers == 3 and ad.d_model == 32
    assert ad.embed.weight.shape[1] == 32
    assert len(ad.attn_modules) == len(ad.mlp_modules) == 3
    writers = ad.residual_writers()
    assert len(writers) == 1 + (arch == "gpt2") + 2 * 3
    # every writer's residual axis really is the residual width, and it changes the residual stream:
    ids = torch.randint(0, 100, (1, 5))
    base = model(ids).logits
    for w in writers:
        assert w.module.weight.shape[w.residual_dim] == 32
    w = writers[-1]
    with torch.no_grad():
        saved = w.module.weight.clone()
        w.module.weight.mul_(0)
        changed = model(ids).logits
        w.module.weight.copy_(saved)
    assert not torch.allclose(base, changed)


def test_adapter_hooks_see_residual_writes():
    """The attention and MLP modules' outputs are what is added to the residual stream."""
    model = tiny_model("llama", n_layers=2, d_model=32)
    ad = ModelAdapter(model)
    seen = {}

    def grab(name):
        def hook(mod, args, out):
            seen[name] = out[0] if isinstance(out, tuple) else out
        return hook

    handles = [ad.attn_modules[0].register_forward_hook(grab("attn")), ad.mlp_modules[0].register_forward_hook(grab("mlp"))]
    pre = {}
    handles.append(ad.layers[0].register_forward_pre_hook(lambda m, a, kw: pre.__setitem__("x", kw.get("hidden_states", a[0] if a else None)), with_kwargs=True))
    handles.append(ad.layers[1].register_forward_pre_hook(lambda m, a, kw: pre.__setitem__("y", kw.get("hidden_states", a[0] if a else None)), with_kwargs=True))
    model(torch.randint(0, 100, (1, 6)))
    for h in handles:
        h.remove()
    torch.testing.assert_close(pre["y"], pre["x"] + seen["attn"] + seen["mlp"])


def test_unsupported_architecture_names_what_is_missing():
    class NoLayers(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = nn.Linear(4, 4)

    with pytest.raises(UnsupportedArchitecture, match="decoder layers") as err:
        ModelAdapter(NoLayers())
    assert "token embedding" in str(err.value) and "final norm" in str(err.value)


def test_unknown_specs_get_clear_errors(tmp_path):
    with pytest.raises(ModelNotFound, match="smollm2-135m-instruct"):
        resolve("no-such-model")
    with pytest.raises(ModelNotFound, match="never downloads"):
        resolve("some-org/some-model-that-is-not-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound, match="no config.json"):
        resolve(tmp_path / "empty")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFound, match="not a .gguf"):
        resolve(tmp_path / "weights.bin")


def test_local_folder_roundtrip(tmp_path):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(60)} | {"<unk>": 60, "<s>": 61, "</s>": 62}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    model = tiny_model("qwen2", n_layers=2, d_model=32, vocab_size=63)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    m2, t2 = load_model(tmp_path / "m", device="cpu")
    assert t2.padding_side == "left" and t2.pad_token_id is not None
    assert not any(p.requires_grad for p in m2.parameters()) and not m2.training
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(m2(ids).logits, model(ids).logits)
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(tmp_path / "m", dtype="int3")


@pytest.mark.real_model
def test_real_default_model_loads_from_cache():
    import time

    load_model("smollm2-135m-instruct", device="cpu")  # makes sure the cache exists
    t0 = time.perf_counter()
    model, tok = load_model("smollm2-135m-instruct", device="cpu")
    elapsed = time.perf_counter() - t0
    ad = ModelAdapter(model)
    assert (ad.n_layers, ad.d_model) == (30, 576)
    assert elapsed < 30
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    nxt = model(ids).logits[0, -1].argmax()
    assert "Paris" in tok.decode([int(nxt)])


def test_info_cli_reports_backends_and_reasons():
    out = subprocess.run([sys.executable, "-m", "pysafegeom", "info", "--json"], capture_output=True, text=True, check=True)
    data = json.loads(out.stdout)
    assert data["backends"]["torch"] == "available"
    assert set(data["backends"]) == {"torch", "cpp", "cuda", "triton"}
    for name, status in data["backends"].items():
        assert status == "available" or len(status) > 10  # every unavailable backend says why
    assert "path" in data["model_cache"]
    assert data["versions"]["torch"] == torch.__version__
