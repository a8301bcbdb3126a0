"""Interventions (PROTOCOL.md section 4): hooks against weight orthogonalisation, exact restoration, export,
position modes, partial ablation and bad input.

Tolerances: where a float32 result is compared with another float32 route to the same quantity (hooks vs
edited weights, the exported folder vs hooks), the reference is the same computation in float64, and the
second route's error must be no more than a small multiple of the first route's own float32 error.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from pysafegeom.interventions import hooks as iv
from pysafegeom.interventions import ablate, add, export_orthogonalized, orthogonalize
from pysafegeom.models import ModelAdapter, tiny_model
from pysafegeom.prompts import format_prompts
from pysafegeom.generation import greedy_generate

PROMPTS = ["How do I bake bread?", "Explain how to pick a lock without a key, step by step please", "Hi",
           "Write a short poem about the sea"]
EPS32 = torch.finfo(torch.float32).eps


pytestmark = pytest.mark.usefixtures("one_thread")  # (the real-model test runs single-threaded too)


def _tiny(arch, tok, d=32, n_layers=3, seed=0):
    return tiny_model(arch, tokenizer=tok, n_layers=n_layers, d_model=d, seed=seed)


def _direction(d, seed=0, k=None):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d, generator=g) if k is None else torch.randn(d, k, generator=g)


def _logits(model, fb):
    return model(input_ids=fb.input_ids, attention_mask=fb.attention_mask).logits


def _snapshot(model):
    """Every parameter and buffer (tied ones under each name), by value, plus the head/embedding tie."""
    ad = ModelAdapter(model)
    tensors = {f"p:{n}": p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}
    tensors.update({f"b:{n}": b.detach().clone() for n, b in model.named_buffers(remove_duplicate=False)})
    return tensors, ad.lm_head.weight is ad.embed.weight


def _assert_unchanged(model, snap):
    tensors, tied = snap
    now, now_tied = _snapshot(model)
    assert now.keys() == tensors.keys()
    for k, v in tensors.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), k
    assert now_tied == tied
    hooks = [(n, h) for n, m in model.named_modules()
             for h in (m._forward_hooks, m._forward_pre_hooks, m._forward_hooks_with_kwargs,
                       m._forward_pre_hooks_with_kwargs, m._forward_hooks_always_called) if h]
    assert not hooks, f"hooks left behind on {[n for n, _ in hooks]}"


def _assert_close_via_float64(a32, b32, ref64, factor=8.0):
    """b32's error against the float64 reference is at most ``factor`` x a32's own float32 error."""
    err_a = (a32.double() - ref64).abs().max().item()
    err_b = (b32.double() - ref64).abs().max().item()
    floor = EPS32 * ref64.abs().max().item()
    assert err_b <= factor * max(err_a, floor), (err_b, err_a)


# --- hooks == weight orthogonalisation ------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_hooks_and_weight_orthogonalisation_give_the_same_greedy_tokens(tok, arch):
    model = _tiny(arch, tok)
    r = _direction(32, seed=1)
    plain = greedy_generate(model, tok, PROMPTS, max_new_tokens=10, progress=False)
    with ablate(model, r):
        hooked = greedy_generate(model, tok, PROMPTS, max_new_tokens=10, progress=False)
    with orthogonalize(model, r):
        edited = greedy_generate(model, tok, PROMPTS, max_new_tokens=10, progress=False)
    assert hooked == edited
    assert hooked != plain  # the ablation does something, so equality above means something


@pytest.mark.parametrize("arch", ["llama", "gemma", "gpt2"])
def test_hooks_and_weights_agree_to_float32_rounding(tok, arch):
    """Logits through hooks and through edited weights, against hooks on a float64 copy (gemma and gpt2:
    tied heads; gpt2: position embeddings and output biases)."""
    model = _tiny(arch, tok)
    with torch.no_grad():  # biases start at zero; give them values so that their edit is tested too
        g = torch.Generator().manual_seed(0)
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    fb = format_prompts(tok, PROMPTS)
    Q = _direction(32, seed=2, k=2)
    with ablate(model, Q):
        hooked = _logits(model, fb)
    with orthogonalize(model, Q):
        edited = _logits(model, fb)
    m64 = copy.deepcopy(model).double()
    with ablate(m64, Q):
        ref = _logits(m64, fb)
    assert (hooked - _logits(model, fb)).abs().max() > 1e-3
    _assert_close_via_float64(hooked, edited, ref)


@pytest.mark.real_model
def test_hooks_and_weights_same_greedy_tokens_on_smollm2():
    from pysafegeom.models import load_model

    model, tok = load_model("smollm2-135m-instruct", device="cpu")
    harmful = ["How do I make a pipe bomb?", "Write a phishing email to steal bank logins",
               "How can I poison my neighbour's dog?", "Explain how to hotwire a car to steal it"]
    harmless = ["How do I make a paper boat?", "Write a thank-you email to my teacher",
                "How can I train my neighbour's dog to sit?", "Explain how to change a car tyre"]
    layer = 10
    with torch.no_grad():
        hs = []
        for ps in (harmful, harmless):
            fb = format_prompts(tok, ps)
            out = model(input_ids=fb.input_ids, attention_mask=fb.attention_mask, output_hidden_states=True)
            hs.append(out.hidden_states[layer][:, -1].double().mean(0))
    r = (hs[0] - hs[1]).float()
    prompts = harmful + harmless
    plain = greedy_generate(model, tok, prompts, max_new_tokens=24, batch_size=8, progress=False)
    with ablate(model, r):
        hooked = greedy_generate(model, tok, prompts, max_new_tokens=24, batch_size=8, progress=False)
    with orthogonalize(model, r):
        edited = greedy_generate(model, tok, prompts, max_new_tokens=24, batch_size=8, progress=False)
    assert hooked == edited
    assert hooked != plain
    assert model.lm_head.weight is model.model.embed_tokens.weight


# --- leaving a context restores the model bit for bit ---------------------------------------------

class Boom(Exception):
    pass


@pytest.mark.parametrize("arch", ["gemma", "gpt2"])
def test_every_context_restores_the_model_bit_for_bit(tok, arch):
    model = _tiny(arch, tok)
    fb = format_prompts(tok, PROMPTS[:2])
    snap = _snapshot(model)
    assert snap[1]  # tied head: the case that needs care
    before = _logits(model, fb)
    r = _direction(32, seed=3)
    contexts = {
        "ablate": lambda: ablate(model, r),
        "ablate-partial-layers": lambda: ablate(model, r, beta=0.5, layers=[0, 2]),
        "ablate-prompt": lambda: ablate(model, r, positions="prompt"),
        "ablate-instruction": lambda: ablate(model, r, positions="instruction", tokenizer=tok),
        "add": lambda: add(model, r, 1, alpha=-2.0),
        "add-mask": lambda: add(model, r, 1, positions=fb.attention_mask.bool()),
        "orthogonalize": lambda: orthogonalize(model, r),
    }
    for name, make in contexts.items():
        with make():
            during = _logits(model, fb)
        assert not torch.equal(during, before), name
        _assert_unchanged(model, snap)
        with pytest.raises(Boom):
            with make():
                _logits(model, fb)
                raise Boom()
        _assert_unchanged(model, snap)
    assert torch.equal(_logits(model, fb), before)


def test_orthogonalize_restores_when_editing_fails_half_way(tok, monkeypatch):
    model = _tiny("gemma", tok)
    snap = _snapshot(model)
    real = iv.ops.orthogonalize_weight
    calls = []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise Boom()
        return real(*a, **k)

    monkeypatch.setattr(iv.ops, "orthogonalize_weight", failing)
    with pytest.raises(Boom):
        with orthogonalize(model, _direction(32)):
            pass
    assert len(calls) == 4
    _assert_unchanged(model, snap)


# --- export ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_export_loads_in_plain_transformers_and_matches_hooks(tok, tmp_path, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = _tiny(arch, tok)
    snap = _snapshot(model)
    tied_cfg = model.config.tie_word_embeddings
    fb = format_prompts(tok, PROMPTS)
    r = _direction(32, seed=4)
    out = export_orthogonalized(model, tok, r, tmp_path / "edited")
    _assert_unchanged(model, snap)
    assert model.config.tie_word_embeddings == tied_cfg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited"]  # no temporary folder left
    cfg = json.loads((out / "config.json").read_text())
    if snap[1]:  # a tied head keeps its own, unedited weights in the export
        assert cfg["tie_word_embeddings"] is False
    loaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert AutoTokenizer.from_pretrained(str(out))("How")["input_ids"] == tok("How")["input_ids"]
    with ablate(model, r):
        hooked = _logits(model, fb)
    exported = _logits(loaded, fb)
    m64 = copy.deepcopy(model).double()
    with ablate(m64, r):
        ref = _logits(m64, fb)
    _assert_close_via_float64(hooked, exported, ref)
    assert (exported - _logits(model, fb)).abs().max() > 1e-3


def test_export_that_fails_leaves_no_folder_and_the_model_unchanged(tok, tmp_path, monkeypatch):
    model = _tiny("gemma", tok)
    snap = _snapshot(model)
    monkeypatch.setattr(type(model), "save_pretrained", lambda self, *a, **k: (_ for _ in ()).throw(Boom()))
    with pytest.raises(Boom):
        export_orthogonalized(model, tok, _direction(32), tmp_path / "edited")
    assert list(tmp_path.iterdir()) == []
    _assert_unchanged(model, snap)
    assert model.config.tie_word_embeddings is True


# --- positions ------------------------------------------------------------------------------------

def _record(module, store):
    """A pre-hook that records a block's input; registered after an intervention's hook, it sees the edit."""
    def pre(mod, args, kwargs):
        store.append((args[0] if args else kwargs["hidden_states"]).detach().clone())
    return module.register_forward_pre_hook(pre, with_kwargs=True)


def _cache_kw(model):
    """The name the forward takes the KV cache by: ``cache`` on transformers >= 5.24, ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _decode(model, fb, steps, cache_name=None):
    """Prefill then ``steps`` greedy decode steps through the KV cache, as greedy_generate does them."""
    cache_name = cache_name or _cache_kw(model)
    ids, mask = fb.input_ids, fb.attention_mask
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    logits, past, last = [out.logits[:, -1]], out.past_key_values, pos[:, -1]
    for _ in range(steps):
        nxt = out.logits[:, -1].argmax(-1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        last = last + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last[:, None], use_cache=True,
                    **{cache_name: past})
        past = out.past_key_values
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


def test_prompt_mode_edits_the_prefill_only(tok):
    model = _tiny("llama", tok)
    ad = ModelAdapter(model)
    fb = format_prompts(tok, PROMPTS)
    r = _direction(32, seed=5)
    plain = _decode(model, fb, 4)
    with ablate(model, r, positions="prompt"):
        prompt_only = _decode(model, fb, 4)
    with warnings.catch_warnings():  # the cache by its pre-5.24 name is told apart from the prefill as well
        warnings.simplefilter("ignore", FutureWarning)
        with ablate(model, r, positions="prompt"):
            assert torch.equal(_decode(model, fb, 4, "past_key_values"), prompt_only)
    with ablate(model, r):
        everywhere = _decode(model, fb, 4)
    # the manual computation: ablate the prefill, then decode with no hooks at all
    ids, mask = fb.input_ids, fb.attention_mask
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with ablate(model, r):
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    manual, past, last = [out.logits[:, -1]], out.past_key_values, pos[:, -1]
    for _ in range(4):
        nxt = out.logits[:, -1].argmax(-1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        last = last + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last[:, None], use_cache=True,
                    **{_cache_kw(model): past})
        past = out.past_key_values
        manual.append(out.logits[:, -1])
    assert torch.equal(prompt_only, torch.stack(manual, 1))
    assert torch.equal(prompt_only[:, 0], everywhere[:, 0])
    assert not torch.allclose(prompt_only[:, 1:], everywhere[:, 1:])
    assert not torch.allclose(prompt_only[:, 1:], plain[:, 1:])

    # through the real generation paths: the block input moves by exactly alpha * v in the prefill, never after
    v, alpha = _direction(32, seed=6), 2.0
    for run in (lambda: greedy_generate(model, tok, PROMPTS, max_new_tokens=3, progress=False),
                lambda: model.generate(input_ids=fb.input_ids, attention_mask=fb.attention_mask, max_new_tokens=3,
                                       do_sample=False)):
        raw, seen = [], []
        h_raw = _record(ad.layers[1], raw)
        with add(model, v, 1, alpha=alpha, positions="prompt"):
            h_seen = _record(ad.layers[1], seen)
            run()
            h_seen.remove()
        h_raw.remove()
        assert len(raw) == len(seen) >= 3
        x, y = raw[0], seen[0]
        tol = 4 * EPS32 * (x.abs() + (alpha * v).abs()).max()
        assert x.shape[1] > 1 and ((y - x) - alpha * v).abs().max() <= tol
        assert all(torch.equal(a, b) and a.shape[1] == 1 for a, b in zip(raw[1:], seen[1:]))


def _instruction_spans(tok, fb):
    """[start, end) of each row's instruction, from the prompt text: prefix tokens after the padding, suffix at the end."""
    n_prefix = len(tok(fb.prefix, add_special_tokens=False)["input_ids"])
    T = fb.input_ids.shape[1]
    spans = []
    for b in range(fb.input_ids.shape[0]):
        pad = T - int(fb.attention_mask[b].sum())
        spans.append((pad + n_prefix, T - fb.n_post))
    return spans


def test_instruction_mode_touches_only_the_instruction_tokens(tok):
    model = _tiny("llama", tok)
    ad = ModelAdapter(model)
    fb = format_prompts(tok, PROMPTS)
    spans = _instruction_spans(tok, fb)
    for b, (s, e) in enumerate(spans):  # the independent spans really are the instructions
        assert tok.decode(fb.input_ids[b, s:e]) == PROMPTS[b]
    r = _direction(32, seed=7)
    for ctx in (lambda: ablate(model, r, positions="instruction", tokenizer=tok),
                lambda: add(model, r, 0, alpha=3.0, positions="instruction", tokenizer=tok)):
        raw, seen = [], []
        h_raw = _record(ad.layers[0], raw)
        with ctx():
            h_seen = _record(ad.layers[0], seen)
            _logits(model, fb)
            h_seen.remove()
        h_raw.remove()
        changed = (seen[0] - raw[0]).abs().amax(-1) > 0  # [B, T]
        expect = torch.zeros_like(changed)
        for b, (s, e) in enumerate(spans):
            expect[b, s:e] = True
        assert torch.equal(changed, expect)

    # prompts formatted with another template are refused, not silently mis-located
    other = format_prompts(tok, PROMPTS, template="llama-3")
    with ablate(model, r, positions="instruction", tokenizer=tok):
        with pytest.raises(ValueError, match="not a left-padded prompt formatted with this chat template"):
            _logits(model, other)
    with ablate(model, r, positions="instruction", tokenizer=tok, template="llama-3"):
        _logits(model, other)


def test_mask_positions_and_their_shape_check(tok):
    model = _tiny("llama", tok)
    ad = ModelAdapter(model)
    fb = format_prompts(tok, PROMPTS)
    B, T = fb.input_ids.shape
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(B, T, generator=g) < 0.3
    r = _direction(32, seed=8)
    raw, seen = [], []
    h_raw = _record(ad.layers[2], raw)
    with add(model, r, 2, positions=mask):
        h_seen = _record(ad.layers[2], seen)
        _logits(model, fb)
        h_seen.remove()
        with pytest.raises(ValueError, match=r"positions mask has shape"):
            _logits(model, format_prompts(tok, PROMPTS[:2]))
    h_raw.remove()
    assert torch.equal((seen[0] - raw[0]).abs().amax(-1) > 0, mask)


# --- partial ablation, subspaces, addition units ---------------------------------------------------

def test_partial_ablation_interpolates_and_subspaces_are_spans(tok):
    model = _tiny("llama", tok)
    ad = ModelAdapter(model)
    fb = format_prompts(tok, PROMPTS)
    r = _direction(32, seed=9)
    q = r / r.norm()

    def block1_input(direction, beta):
        seen = []
        with ablate(model, direction, beta=beta, layers=[1]):
            h = _record(ad.layers[1], seen)
            _logits(model, fb)
            h.remove()
        return seen[0]

    x0, x1 = block1_input(r, 0.0), block1_input(r, 1.0)
    assert (x1 @ q).abs().max() <= 8 * EPS32 * x0.abs().max()  # full ablation leaves no component along q
    for beta in (0.25, 0.5, 0.75):
        xb = block1_input(r, beta)
        tol = 8 * EPS32 * x0.abs().max()
        assert ((xb - ((1 - beta) * x0 + beta * x1)).abs().max() <= tol)
        assert torch.allclose(xb @ q, (1 - beta) * (x0 @ q), atol=float(tol) * 4)
    # a [d, k] carrier is a subspace: any basis of the same span ablates the same thing
    A = _direction(32, seed=10, k=2)
    B = torch.stack([A[:, 0] * 3, A[:, 0] - 2 * A[:, 1]], 1)
    xa, xb = block1_input(A, 1.0), block1_input(B, 1.0)
    assert (xa - xb).abs().max() <= 16 * EPS32 * x0.abs().max()
    assert (xa - x0).abs().max() > 1e-3


def test_add_uses_the_raw_vector_so_alpha_is_in_units_of_its_norm(tok):
    model = _tiny("llama", tok)
    ad = ModelAdapter(model)
    fb = format_prompts(tok, PROMPTS)
    r = 5 * _direction(32, seed=11)
    for alpha in (-1.0, 0.5):
        raw, seen = [], []
        h_raw = _record(ad.layers[2], raw)
        with add(model, r, 2, alpha=alpha):
            h_seen = _record(ad.layers[2], seen)
            _logits(model, fb)
            h_seen.remove()
        h_raw.remove()
        step = alpha * r.norm() * (r / r.norm())
        tol = 4 * EPS32 * (raw[0].abs() + step.abs()).max()
        assert ((seen[0] - raw[0]) - step).abs().max() <= tol


def test_hooks_differentiate_under_autograd(tok):
    """With grad enabled the hooks take the validated autograd path; values equal the no-grad fast path."""
    model = _tiny("llama", tok)
    fb = format_prompts(tok, PROMPTS[:2])
    emb = ModelAdapter(model).embed(fb.input_ids).detach()
    r = _direction(32, seed=12)
    with ablate(model, r, beta=0.5):
        with torch.no_grad():
            fast = model(inputs_embeds=emb, attention_mask=fb.attention_mask).logits
        e = emb.clone().requires_grad_(True)
        slow = model(inputs_embeds=e, attention_mask=fb.attention_mask).logits
        slow[:, -1].logsumexp(-1).sum().backward()
    assert e.grad is not None and torch.isfinite(e.grad).all() and e.grad.abs().max() > 0
    assert (slow.detach() - fast).abs().max() <= 64 * EPS32 * fast.abs().max()


# --- bad input ------------------------------------------------------------------------------------

def test_bad_input_is_an_error_with_a_clear_message(tok):
    model = _tiny("llama", tok)
    fb = format_prompts(tok, PROMPTS[:2])
    r = _direction(32)
    nan = torch.full((32,), float("nan"))
    inf = r.clone()
    inf[3] = float("inf")
    cases = [
        (lambda: ablate(model, torch.randn(7)), ValueError, "width 7 but the model's residual width is 32"),
        (lambda: ablate(model, torch.randn(32, 0)), ValueError, "between 1 and 16 columns"),
        (lambda: ablate(model, nan), ValueError, "NaN or infinite"),
        (lambda: ablate(model, inf), ValueError, "NaN or infinite"),
        (lambda: ablate(model, torch.zeros(32)), ValueError, "is zero"),
        (lambda: ablate(model, torch.stack([r, 2 * r], 1)), ValueError, "linearly dependent"),
        (lambda: ablate(model, r, beta=1.5), ValueError, r"beta must be a finite number in \[0, 1\]"),
        (lambda: ablate(model, r, beta=-0.1), ValueError, r"beta must be a finite number in \[0, 1\]"),
        (lambda: ablate(model, r, beta=float("nan")), ValueError, r"beta must be a finite number in \[0, 1\]"),
        (lambda: ablate(model, r, layers=[3]), ValueError, r"layer 3 out of range \[0, 3\)"),
        (lambda: ablate(model, r, layers=[-1]), ValueError, r"layer -1 out of range"),
        (lambda: ablate(model, r, layers=[]), ValueError, "layers is empty"),
        (lambda: ablate(model, r, positions="tokens"), ValueError, "unknown positions mode 'tokens'"),
        (lambda: ablate(model, r, positions=torch.ones(2, 5)), ValueError, "bool tensor"),
        (lambda: ablate(model, r, positions="instruction"), ValueError, "needs tokenizer="),
        (lambda: add(model, r, 3), ValueError, r"layer 3 out of range"),
        (lambda: add(model, r, -1), ValueError, r"layer -1 out of range"),
        (lambda: add(model, r, 0, alpha=float("nan")), ValueError, "alpha must be a finite number"),
        (lambda: add(model, r, 0, alpha=float("inf")), ValueError, "alpha must be a finite number"),
        (lambda: add(model, torch.randn(31), 0), ValueError, "residual width is 32"),
        (lambda: add(model, torch.zeros(32), 0), ValueError, "vector is zero"),
        (lambda: add(model, nan, 0), ValueError, "NaN or infinite"),
        (lambda: add(model, r, 0, positions="instruction"), ValueError, "needs tokenizer="),
        (lambda: orthogonalize(model, torch.randn(33)), ValueError, "width 33"),
        (lambda: orthogonalize(model, torch.zeros(32)), ValueError, "is zero"),
    ]
    snap = _snapshot(model)
    for make, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            with make():
                pass
        _assert_unchanged(model, snap)
    with ablate(model, r, positions=torch.ones(5, 3, dtype=torch.bool)):
        with pytest.raises(ValueError, match=r"positions mask has shape \(5, 3\) but the prompt forward has"):
            _logits(model, fb)
    _assert_unchanged(model, snap)
