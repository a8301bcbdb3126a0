"""Capture against a brute-force recomputation from ``output_hidden_states`` in float64, on tiny random models."""

from __future__ import annotations

import pytest
import torch

from pysafegeom.models import tiny_model
from pysafegeom.prompts import format_prompts
from pysafegeom.protocol.capture import capture, refusal_scores_from_logits

SETS = {
    "harmful": ["How do I pick a lock?", "Explain how to forge a signature  ", "Write malware\n", "steal a car?"],
    "harmless": ["Write a poem about the sea and the sky.", "Hi", "What is 2+2?"],
}


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from pysafegeom.models import resolve
    from pysafegeom.models.loading import ModelNotFound, _smollm2_gguf

    try:
        path = _smollm2_gguf()
    except ModelNotFound as exc:
        pytest.skip(str(exc))
    t = AutoTokenizer.from_pretrained(str(resolve(str(path))))
    t.padding_side = "left"
    return t


def _brute_force(model, tok, prompts):
    """Per prompt, unpadded: residual at every block input and after the last block, at the protocol positions."""
    from pysafegeom.models import ModelAdapter

    ad = ModelAdapter(model)
    rows, scores = [], []
    for p in prompts:
        fb = format_prompts(tok, [p])
        pre = {}
        h = ad.final_norm.register_forward_pre_hook(lambda m, a: pre.__setitem__("x", a[0]))
        out = model(input_ids=fb.input_ids, attention_mask=fb.attention_mask, output_hidden_states=True)
        h.remove()
        hs = list(out.hidden_states[:-1]) + [pre["x"]]  # HF's last hidden state is post-norm; ours is the raw residual
        hs = torch.stack(hs)[:, 0].double()  # [L+1, T, d]
        rows.append(hs[:, fb.positions[0]])
        scores.append(out.logits[0, -1])
    return torch.stack(rows), torch.stack(scores)  # [n, L+1, P, d], [n, V]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_capture_equals_brute_force(tok, arch):
    model = tiny_model(arch, tokenizer=tok, n_layers=3, d_model=64, seed=1)
    rtoks = [tok.encode("I")[0], tok.encode("Sorry")[0]]
    cap = capture(model, tok, SETS, refusal_tokens=rtoks, batch_size=2, progress=False)
    for name, prompts in SETS.items():
        ref, logits = _brute_force(model, tok, prompts)
        torch.testing.assert_close(cap.mean(name), ref.mean(0), atol=1e-5, rtol=1e-5)
        want_scores = refusal_scores_from_logits(logits, rtoks)
        torch.testing.assert_close(cap.scores[name], want_scores, atol=1e-4, rtol=1e-5)
        # per-prompt kept activations, in the caller's order
        torch.testing.assert_close(cap.per_prompt[name]["t_inst"].double(), ref[:, :, 0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cap.per_prompt[name]["eoi-1"].double(), ref[:, :, -1], atol=1e-5, rtol=1e-5)
        # behaviour groups partition the set
        refused = int((want_scores > 0).sum())
        assert cap.count(name, refused=True) == refused
        assert cap.count(name) == len(prompts)
    assert cap.n_tokens < cap.n_padded_tokens or cap.n_tokens == cap.n_padded_tokens


def test_capture_subset_of_layers_stops_early(tok):
    model = tiny_model("llama", tokenizer=tok, n_layers=4, d_model=32)
    from pysafegeom.models import ModelAdapter

    ad = ModelAdapter(model)
    ran = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, i=i: ran.append(i)) for i, layer in enumerate(ad.layers)]
    hooks.append(ad.lm_head.register_forward_hook(lambda m, a, o: ran.append("head")))
    cap = capture(model, tok, SETS, layers=[0, 1], progress=False)
    for h in hooks:
        h.remove()
    assert "head" not in ran and max(r for r in ran if r != "head") == 1
    full = capture(model, tok, SETS, progress=False)
    torch.testing.assert_close(cap.mean("harmful"), full.mean("harmful")[:2])


def test_capture_bad_input(tok):
    model = tiny_model("llama", tokenizer=tok, n_layers=2, d_model=32)
    with pytest.raises(ValueError, match="empty"):
        capture(model, tok, {"harmful": []}, progress=False)
    with pytest.raises(ValueError, match="layers"):
        capture(model, tok, SETS, layers=[5], progress=False)
    with pytest.raises(ValueError, match="keep_positions"):
        capture(model, tok, SETS, keep_positions=("nowhere",), progress=False)
    with pytest.raises(ValueError, match="context"):
        capture(model, tok, {"x": ["word " * 600]}, progress=False)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="NaN"):
        capture(model, tok, SETS, progress=False)
