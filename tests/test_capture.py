"""Capture against a brute-force recomputation from ``output_hidden_states`` in float64, on tiny random models."""

from __future__ import annotations

import pytest
import torch

from pysafegeom.models import tiny_model

from brute import positions_brute_force
from pysafegeom.protocol.capture import capture, refusal_scores_from_logits

SETS = {
    "harmful": ["How do I pick a lock?", "Explain how to forge a signature  ", "Write malware\n", "steal a car?"],
    "harmless": ["Write a poem about the sea and the sky.", "Hi", "What is 2+2?"],
}


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma", "gpt2"])
def test_capture_equalspositions_brute_force(tok, arch):
    # gpt2 has absolute position embeddings: left-padded batches equal the unpadded brute force only when
    # position_ids are derived from the attention mask (models/forward.py)
    model = tiny_model(arch, tokenizer=tok, n_layers=3, d_model=64, seed=1)
    rtoks = [tok.encode("I")[0], tok.encode("Sorry")[0]]
    cap = capture(model, tok, SETS, refusal_tokens=rtoks, batch_size=2, progress=False)
    for name, prompts in SETS.items():
        ref, logits = positions_brute_force(model, tok, prompts)
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
    # real tokens counted are exactly the unpadded prompt lengths
    from pysafegeom.prompts import encode_prompts

    want = sum(len(r) for prompts in SETS.values() for r in encode_prompts(tok, prompts).rows)
    assert cap.n_tokens == want <= cap.n_padded_tokens


def test_capture_subset_of_layers_stops_early(tok):
    model = tiny_model("llama", tokenizer=tok, n_layers=4, d_model=32)
    from pysafegeom.models import ModelAdapter

    ad = ModelAdapter(model)
    ran = []  # (layer or "head", rows, tokens) of every call
    hooks = [layer.register_forward_pre_hook(lambda m, a, k, i=i: ran.append((i, *(a[0] if a else k["hidden_states"]).shape[:2])),
                                             with_kwargs=True) for i, layer in enumerate(ad.layers)]
    hooks.append(ad.lm_head.register_forward_hook(lambda m, a, o: ran.append(("head", *a[0].shape[:2]))))
    cap = capture(model, tok, SETS, layers=[0, 1], progress=False)
    for h in hooks:
        h.remove()
    # the shared template prefix runs once through the whole model (one row, the head on its last token only);
    # every batch of prompts stops after layer 1
    from pysafegeom.models.forward import common_prefix_length
    from pysafegeom.prompts import encode_prompts

    P = common_prefix_length([r for p in SETS.values() for r in encode_prompts(tok, p).rows])
    assert P >= 2
    late = [r for r in ran if r[0] == "head" or r[0] >= 2]
    assert late == [(2, 1, P), (3, 1, P), ("head", 1, 1)]
    assert max(r[0] for r in ran if r[1] > 1) == 1
    full = capture(model, tok, SETS, progress=False)
    torch.testing.assert_close(cap.mean("harmful"), full.mean("harmful")[:2])


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma"])
def test_shared_prefix_capture_equals_full_rows(tok, arch, monkeypatch):
    """The template prefix run once (default) captures what running every row in full does, scores included."""
    import pysafegeom.protocol.capture as C

    model = tiny_model(arch, tokenizer=tok, n_layers=3, d_model=32, seed=5)
    rtoks = [tok.encode("I")[0], tok.encode("Sorry")[0]]
    fast = capture(model, tok, SETS, refusal_tokens=rtoks, batch_size=3, keep_positions="all", progress=False)
    monkeypatch.setattr(C, "SHARED_PREFIX", False)
    slow = capture(model, tok, SETS, refusal_tokens=rtoks, batch_size=3, keep_positions="all", progress=False)
    torch.testing.assert_close(fast.sums, slow.sums, atol=1e-4, rtol=1e-5)
    assert torch.equal(fast.counts, slow.counts)
    assert (fast.n_tokens, fast.n_padded_tokens) == (slow.n_tokens, slow.n_padded_tokens)
    for name in SETS:
        torch.testing.assert_close(fast.scores[name], slow.scores[name], atol=1e-4, rtol=1e-5)
        for p in fast.position_names:
            torch.testing.assert_close(fast.per_prompt[name][p], slow.per_prompt[name][p], atol=1e-5, rtol=1e-5)


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


def test_keep_positions_per_set(tok):
    """A dict keeps every position for the named sets and t_inst / eoi-1 for the others, with the same rows as
    a capture that keeps every position everywhere."""
    model = tiny_model("llama", tokenizer=tok, n_layers=2, d_model=32, seed=2)
    some = capture(model, tok, SETS, keep_positions={"harmful": "all"}, batch_size=3, progress=False)
    full = capture(model, tok, SETS, keep_positions="all", batch_size=3, progress=False)
    assert sorted(some.per_prompt["harmful"]) == sorted(full.position_names)
    assert sorted(some.per_prompt["harmless"]) == ["eoi-1", "t_inst"]
    for name, kept in some.per_prompt.items():
        for pos, x in kept.items():
            torch.testing.assert_close(x, full.per_prompt[name][pos])
    with pytest.raises(ValueError, match="not captured"):
        capture(model, tok, SETS, keep_positions={"nope": "all"}, progress=False)
