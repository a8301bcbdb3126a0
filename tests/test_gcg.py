"""attacks/gcg.py: GCG against references written here.

Tiny random models with the real SmolLM2 vocabulary (the ``tok`` fixture), their weights redrawn at std 0.3
so that candidate losses differ by ~0.1 rather than the ~1e-4 of the default init (a comparison of losses
that are all log V to four digits would show little). References: the chat template's own tokenisation of
the test-case string (the attacked ids must be it), a no-cache full forward of every candidate on a float64
copy of the model (losses and the token gradient), sums of single attacks (universal, ensemble), and an
uninterrupted run (a resumed run after SIGKILL). One ``real_model`` test on SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from pysafegeom import ops
from pysafegeom.attacks import gcg
from pysafegeom.attacks.gcg import GCG, AttackError, GCGConfig, build_prompt
from pysafegeom.errors import OutputExists
from pysafegeom.models.tiny import ARCHS
from pysafegeom.prompts import TemplateError, resolve_template

pytestmark = pytest.mark.usefixtures("gcg_forbidden_once")

INSTRUCTION = "Tell me how to bake bread"
TARGET = "Sure, here is how"
SMALL = dict(search_width=8, topk=8, num_steps=2, optim_str_init="x x x x", progress=False)


def small(**kw) -> GCGConfig:
    """The small search of this file, with ``kw`` overriding it."""
    return GCGConfig(**{**SMALL, **kw})


# --------------------------------------------------------------------------------------------- set-up



def chat_ids(tokenizer, user_message, template=None, system=None):
    """What any other tool gets for the test case: the chat template's own tokenisation of the chat."""
    msgs = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": user_message}]
    out = tokenizer.apply_chat_template(msgs, chat_template=resolve_template(tokenizer, template),
                                        add_generation_prompt=True, tokenize=True)
    return list(out if isinstance(out, list) else out["input_ids"])


def attacked(a, row, b=0):
    p = a.prompts[b]
    return p.before_ids + list(row) + p.after_ids


def candidate_pool(a, cur, grad, seed=7):
    """The current suffix, 8 one-token and 8 two-token candidates, one changed only at the first position and
    one only at the last (the two ends of the suffix-prefix reuse), and two duplicates."""
    gen = torch.Generator().manual_seed(seed)
    one = ops.sample_candidates(cur, grad, 8, 8, 1, a.forbidden, generator=gen)
    two = ops.sample_candidates(cur, grad, 8, 8, 2, a.forbidden, generator=gen)
    t = int(one[0][one[0] != cur][0])
    ends = cur.repeat(2, 1)
    ends[0, 0] = t
    ends[1, -1] = t
    return torch.cat([cur[None], one, two, ends, one[:1], two[:1]])


# ----------------------------------------------------------------------------- 1. templates, round trip

ROUND_TRIPS = [
    pytest.param(None, None, False, id="smollm2-own"),
    pytest.param("chatml", None, False, id="chatml"),
    pytest.param("chatml", "You answer in one line.", False, id="chatml-system"),
    pytest.param("llama-2", None, False, id="llama-2"),
    pytest.param("llama-2", "You answer in one line.", False, id="llama-2-system"),
    # "\n\n" then "Sure" retokenises as "\n" "\n" "Sure" with this tokenizer: the target needs its space
    pytest.param("llama-3", None, True, id="llama-3"),
    pytest.param("mistral", None, False, id="mistral"),
    pytest.param("zephyr", None, False, id="zephyr"),
    pytest.param("gemma", None, False, id="gemma"),
    pytest.param("plain", None, False, id="plain"),
]


@pytest.mark.parametrize("template,system,space", ROUND_TRIPS)
def test_attacked_ids_are_the_chat_templates_tokens_of_the_test_case(tok, make_model, template, system, space):
    """For the init, sampled candidates and rows built to fuse across tokens: the retokenisation filter keeps a
    candidate exactly when ``apply_chat_template(instruction + its text)`` gives the attacked ids (so both
    outcomes are seen); the run's test case is instruction + best string and reproduces its ids."""
    model = make_model("llama")
    cfg = small(template=template, system=system, add_space_before_target=space)
    a = GCG(model, tok, INSTRUCTION, TARGET, cfg)
    cur = torch.tensor(a.init_ids[0])
    grad = a.token_grad(cur)[0]
    gen = torch.Generator().manual_seed(0)
    sampled = torch.cat([ops.sample_candidates(cur, grad, 12, 8, n, a.forbidden, generator=gen) for n in (1, 2)])
    fusing = cur.repeat(4, 1)  # a space-less piece after " x": BPE may fuse the two into one token
    for i, piece in enumerate(["x", "ing", "s", "ed"]):
        fusing[i, 1] = tok.convert_tokens_to_ids(piece)
    rows = torch.cat([cur[None], sampled, fusing])
    keep = a.filter(rows)
    texts = a.suffix_strings(rows)
    for i, row in enumerate(rows.tolist()):
        same = texts[i] is not None and chat_ids(tok, INSTRUCTION + texts[i], template, system) == attacked(a, row)
        assert bool(keep[i]) == same, (i, texts[i])
    assert keep[0] and keep.sum() > rows.shape[0] // 2 and not keep.all()

    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True,
                                       chat_template=resolve_template(tok, template))
    if template is None:  # SmolLM2's template opens with <|im_start|>, its BOS: the marker is kept
        assert a.prompts[0].before_ids[0] == tok.bos_token_id == tok.convert_tokens_to_ids("<|im_start|>")
    if rendered.startswith(tok.bos_token):
        assert attacked(a, cur.tolist())[0] == tok.bos_token_id

    res = a.run()
    assert res.test_cases == [INSTRUCTION + res.best_string]
    assert chat_ids(tok, res.test_cases[0], template, system) == attacked(a, res.best_ids)
    assert len(res.losses) == len(res.strings) == 2 and res.best_loss == min(res.losses)


# -------------------------------------------------------------------- 2. losses equal a brute force

def brute_losses(model64, prompt, rows, alpha=None):
    """float64 ``[N]``: each row's full no-cache forward, mean CE of the target tokens (or, with ``alpha``, the
    mellowmax of the negated target logits)."""
    T = len(prompt.target_ids)
    tgt = torch.tensor(prompt.target_ids)
    out = []
    for r in rows.tolist():
        ids = prompt.before_ids + r + prompt.after_ids + prompt.target_ids
        with torch.no_grad():
            logits = model64(input_ids=torch.tensor([ids])).logits[0, len(ids) - T - 1:len(ids) - 1]
        if alpha is None:
            out.append(torch.nn.functional.cross_entropy(logits, tgt))
        else:
            z = -logits.gather(1, tgt[:, None])[:, 0]
            out.append((torch.logsumexp(alpha * z, 0) - math.log(T)) / alpha)
    return torch.stack(out)


SPEEDUPS = {  # each on top of the reference (every speed-up off)
    "prefix_cache": dict(use_prefix_cache=True),
    "target_only": dict(target_only_logits=True),
    "target_only+prefix_cache": dict(target_only_logits=True, use_prefix_cache=True),
    "reuse_suffix_prefix": dict(use_prefix_cache=True, reuse_suffix_prefix=True),
    "dedupe": dict(dedupe=True),
}


@pytest.mark.parametrize("loss", ["ce", "mellowmax"])
@pytest.mark.parametrize("arch", ARCHS)
def test_candidate_losses_match_a_float64_brute_force(tok, make_model, arch, loss):
    """Each exact speed-up alone and all together (the default, also cut into small batches): error against
    the float64 brute force <= 4x the plain fp32 path's + 1e-6."""
    model = make_model(arch)
    model64 = copy.deepcopy(model).double()
    base = dict(SMALL, use_mellowmax=loss == "mellowmax", mellowmax_alpha=0.7)
    ref = GCG(model, tok, INSTRUCTION, TARGET, GCGConfig.reference(**base))
    cur = torch.tensor(ref.init_ids[0])
    rows = candidate_pool(ref, cur, ref.token_grad(cur)[0])
    want = brute_losses(model64, ref.prompts[0], rows, 0.7 if loss == "mellowmax" else None)
    got_ref, _ = ref._score_step(rows, cur)
    e_ref = float((got_ref.double() - want).abs().max())
    assert got_ref.dtype == torch.float32 and e_ref < 1e-4

    configs = {name: dataclasses.replace(GCGConfig.reference(**base), **kw) for name, kw in SPEEDUPS.items()}
    configs["default"] = GCGConfig(**base)
    configs["default, small batches"] = GCGConfig(**base, batch_size=3, batch_overhead_rows=1)
    configs["default, row cap"] = GCGConfig(**base, batch_max_rows=40)
    for name, cfg in configs.items():
        a = GCG(model, tok, INSTRUCTION, TARGET, cfg)
        a.token_grad(cur)  # the suffix-prefix KV the reuse takes
        s = a.scorers[0]
        assert s.target_only == cfg.target_only_logits, name  # the speed-up is really on (plain heads here)
        assert (s.step_kv[0] is not None) == (cfg.use_prefix_cache and cfg.reuse_suffix_prefix), name
        got, n_scored = a._score_step(rows, cur)
        e_fast = float((got.double() - want).abs().max())
        assert e_fast <= 4 * e_ref + 1e-6, (name, e_fast, e_ref)
        assert n_scored == (torch.unique(rows, dim=0).shape[0] if cfg.dedupe else rows.shape[0]), name


@pytest.mark.parametrize("arch", ARCHS)
def test_token_gradient_matches_float64_autograd(tok, make_model, arch):
    """``d loss / d onehot``: the embedding is linear in the one-hot, so the brute force is the float64
    gradient at the suffix's input embeddings times the embedding module's output for every token (its own
    scale included, as Gemma's); both the reference and the default (prefix cache, target-only) paths."""
    model = make_model(arch)
    model64 = copy.deepcopy(model).double()
    ref = GCG(model, tok, INSTRUCTION, TARGET, GCGConfig.reference(**SMALL))
    fast = GCG(model, tok, INSTRUCTION, TARGET, small())
    p = ref.prompts[0]
    cur = torch.tensor(ref.init_ids[0])
    P, L, T = len(p.before_ids), cur.shape[0], len(p.target_ids)
    emb = model64.get_input_embeddings()
    with torch.no_grad():
        x = emb(torch.tensor([attacked(ref, cur.tolist()) + p.target_ids]))
        table = emb(torch.arange(emb.weight.shape[0]))  # [V, d]
    x.requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(model64(inputs_embeds=x).logits[0, -T - 1:-1], torch.tensor(p.target_ids))
    loss.backward()
    loss = float(loss.detach())
    want = x.grad[0, P:P + L] @ table.T  # [L, V]
    g_ref, lo_ref = ref.token_grad(cur)
    g_fast, lo_fast = fast.token_grad(cur)
    assert g_fast.shape == want.shape and g_fast.dtype == torch.float32
    e_ref = float((g_ref.double() - want).abs().max())
    e_fast = float((g_fast.double() - want).abs().max())
    assert e_ref < 1e-4 * float(want.abs().max())
    assert e_fast <= 4 * e_ref + 1e-6 * float(want.abs().max()), (e_fast, e_ref)
    assert abs(lo_fast - loss) <= 4 * abs(lo_ref - loss) + 1e-6


# ---------------------------------------------------------------------------------- 3. dedupe, memo

def test_duplicates_are_scored_once_and_the_memo_skips_repeats(tok, make_model):
    a = GCG(make_model("llama"), tok, INSTRUCTION, TARGET, small())
    cur = torch.tensor(a.init_ids[0])
    grad = a.token_grad(cur)[0]
    cands = ops.sample_candidates(cur, grad, 8, 8, 1, a.forbidden, seed=3)
    rows = torch.cat([cands, cands[[5, 0, 5]], cur[None], cur[None]])
    n_unique = torch.unique(rows, dim=0).shape[0]
    lo, n = a._score_step(rows, cur)
    assert n == n_unique < rows.shape[0]
    for i in range(rows.shape[0]):
        for j in range(rows.shape[0]):
            if torch.equal(rows[i], rows[j]):
                assert lo[i] == lo[j]
    torch.testing.assert_close(lo, a.candidate_losses(rows, cur))  # every row scored: the same losses
    lo2, n2 = a._score_step(rows, cur)
    assert n2 == 0 and torch.equal(lo2, lo)
    fresh = ops.sample_candidates(cur, grad, 1, 8, 2, a.forbidden, seed=11)
    assert not (rows == fresh).all(1).any()
    lo3, n3 = a._score_step(torch.cat([rows, fresh]), cur)
    assert n3 == 1 and torch.equal(lo3[:-1], lo)

    res = GCG(make_model("llama"), tok, INSTRUCTION, TARGET, small(num_steps=3)).run()
    assert all(0 <= s <= c for s, c in zip(res.n_scored, res.n_candidates))
    plain = GCG(make_model("llama"), tok, INSTRUCTION, TARGET, small(num_steps=3, dedupe=False)).run()
    assert plain.n_scored == plain.n_candidates


def greedy_matches(model, ids, target_ids):
    """By hand: the argmax at every target position of one no-cache forward equals the target."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids + target_ids[:-1]])).logits[0, -len(target_ids):]
    return logits.argmax(-1).tolist() == target_ids


def test_early_stop_ends_at_the_first_suffix_that_greedily_gives_the_target(tok, make_model, tmp_path):
    """The target is the model's own greedy continuation of the init prompt, so some step's suffix gives it;
    the early-stopped run is the full run cut at the first such step, with that suffix as its best."""
    model = make_model("llama")
    a = GCG(model, tok, INSTRUCTION, TARGET, small())
    ids = attacked(a, a.init_ids[0])
    new = []
    for _ in range(3):
        with torch.no_grad():
            new.append(int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax()))
    target = tok.decode(new)
    cfg = small(num_steps=6, topk=4)
    full = GCG(model, tok, INSTRUCTION, target, cfg).run(tmp_path / "full")
    rows = torch.load(tmp_path / "full" / gcg.STATE_FILE, weights_only=False)["id_rows"]
    b = GCG(model, tok, INSTRUCTION, target, cfg)
    assert b.prompts[0].target_ids == new
    hits = [k for k, r in enumerate(rows) if greedy_matches(model, attacked(b, r), new)]
    assert hits, "no step's suffix gives the target: the test would not test the stop"
    k = hits[0]
    es = GCG(model, tok, INSTRUCTION, target, dataclasses.replace(cfg, early_stop=True)).run()
    assert es.stopped_early and es.success_step == k + 1
    assert es.losses == full.losses[:k + 1] and es.best_ids == rows[k]
    assert not full.stopped_early and full.success_step is None and len(full.losses) == 6


@pytest.mark.parametrize("size", [0, 3])
def test_the_buffer_keeps_the_best_suffixes_seen_and_continues_from_the_best(tok, make_model, size, tmp_path):
    """Simulated from each step's scored candidates: the buffer starts as the inits sorted by loss, takes a
    step's best candidate in place of its worst entry when lower (size 0: always moves to it), and every step
    searches from, and reports the loss of, the buffer's best."""
    inits = ["x x x x", "y y y y", "z z z z"][:max(1, size)]
    a = GCG(make_model("llama"), tok, INSTRUCTION, TARGET, small(num_steps=8, topk=16, search_width=4,
                                                                   buffer_size=size, optim_str_init=inits))
    assert len(a.init_ids) == len(inits)
    init = torch.tensor(a.init_ids)
    lo0 = a.candidate_losses(init, init[0])
    buf = sorted([(float(lo0[i]), a.init_ids[i]) for i in range(len(inits))], key=lambda e: e[0])
    steps = []
    real = a._score_step

    def spy(cands, cur):
        lo, n = real(cands, cur)
        steps.append((cur.tolist(), cands.clone(), lo.clone()))
        return lo, n

    a._score_step = spy
    res = a.run(tmp_path)
    want_losses, worse = [], 0
    for cur, cands, lo in steps:
        assert cur == buf[0][1]
        k = int(lo.argmin())
        best = (float(lo[k]), cands[k].tolist())
        if size == 0:
            buf = [best]
        elif best[0] < buf[-1][0]:
            buf = sorted(buf[:-1] + [best], key=lambda e: e[0])
        else:
            worse += best[0] > buf[-1][0]
        want_losses.append(buf[0][0])
    assert res.losses == want_losses and len(steps) == 8
    assert [(lo, ids) for lo, ids in torch.load(tmp_path / gcg.STATE_FILE, weights_only=False)["buffer"]] == buf
    if size:
        assert worse > 0  # some step's best was worse than the whole buffer: that branch is tested too
        assert all(b <= a for a, b in zip(res.losses, res.losses[1:]))


# ------------------------------------------------------------------------------- 4. exclude_current

def test_exclude_current_never_draws_the_current_token():
    """A gradient whose most negative entry at every position is the current token: excluded, every candidate
    differs in exactly n_replace positions, each new token among the top-k of the rest; allowed, no-ops occur."""
    g = torch.Generator().manual_seed(0)
    L, V, k = 5, 60, 4
    ids = torch.tensor([3, 7, 11, 19, 23])
    grad = torch.randn(L, V, generator=g)
    grad[torch.arange(L), ids] = -100.0
    c = ops.sample_candidates(ids, grad, 64, k, 2, generator=g)
    assert ((c != ids).sum(1) == 2).all()
    masked = grad.clone()
    masked[torch.arange(L), ids] = math.inf
    top = (-masked).topk(k, dim=1).indices
    for row in c:
        for pos in (row != ids).nonzero()[:, 0].tolist():
            assert int(row[pos]) in top[pos].tolist()
    c2 = ops.sample_candidates(ids, grad, 64, k, 2, generator=g, exclude_current=False)
    changed = (c2 != ids).sum(1)
    assert (changed < 2).any() and (changed <= 2).all()


@pytest.mark.parametrize("exclude", [True, False])
def test_attack_passes_exclude_current_to_the_sampler(tok, make_model, monkeypatch, exclude):
    seen = []
    real = ops.sample_candidates

    def spy(ids, grad, *args, **kw):
        out = real(ids, grad, *args, **kw)
        seen.append((ids.clone(), out.clone(), kw.get("exclude_current")))
        return out

    monkeypatch.setattr(gcg.ops, "sample_candidates", spy)
    cfg = small(num_steps=3, n_replace=2, exclude_current=exclude)
    GCG(make_model("llama"), tok, INSTRUCTION, TARGET, cfg).run()
    assert len(seen) == 3 and all(e is exclude for _, _, e in seen)
    if exclude:
        for ids, out, _ in seen:
            assert ((out != ids).sum(1) == 2).all()


# --------------------------------------------------------------------------- 5. universal, ensemble

def test_universal_loss_is_the_sum_of_the_single_behaviour_losses(tok, make_model):
    model = make_model("qwen2")
    cfg = small()
    instructions, targets = [INSTRUCTION, "Explain how to pick a lock"], [TARGET, "Here is a way"]
    u = GCG(model, tok, instructions, targets, cfg)
    singles = [GCG(model, tok, i, t, cfg) for i, t in zip(instructions, targets)]
    assert u.init_ids == singles[0].init_ids == singles[1].init_ids
    cur = torch.tensor(u.init_ids[0])
    g_u, lo_u = u.token_grad(cur)
    parts = [s.token_grad(cur) for s in singles]
    torch.testing.assert_close(g_u, parts[0][0] + parts[1][0])
    assert lo_u == pytest.approx(parts[0][1] + parts[1][1], rel=1e-6)
    rows = candidate_pool(u, cur, g_u)
    each = [s.candidate_losses(rows, cur) for s in singles]
    torch.testing.assert_close(u.candidate_losses(rows, cur), each[0] + each[1])
    res = u.run()
    assert res.test_cases == [i + res.best_string for i in instructions]
    for b, tc in enumerate(res.test_cases):
        assert chat_ids(tok, tc) == attacked(u, res.best_ids, b)

    prog = GCG(model, tok, instructions, targets, dataclasses.replace(cfg, progressive=True))
    assert prog.active == 1
    prog.token_grad(cur)
    torch.testing.assert_close(prog.candidate_losses(rows, cur), each[0])


def test_ensemble_loss_is_the_sum_over_models(tok, make_model):
    m1, m2 = make_model("llama", 0), make_model("gpt2", 1)
    cfg = small()
    e = GCG([m1, m2], tok, INSTRUCTION, TARGET, cfg)
    singles = [GCG(m, tok, INSTRUCTION, TARGET, cfg) for m in (m1, m2)]
    cur = torch.tensor(e.init_ids[0])
    g_e, _ = e.token_grad(cur)
    parts = [s.token_grad(cur)[0] for s in singles]
    torch.testing.assert_close(g_e, parts[0] + parts[1])
    rows = candidate_pool(e, cur, g_e)
    each = [s.candidate_losses(rows, cur) for s in singles]
    assert not torch.allclose(each[0], each[1])
    torch.testing.assert_close(e.candidate_losses(rows, cur), each[0] + each[1])
    assert GCG([m1, m2], [tok, tok], INSTRUCTION, TARGET, cfg).init_ids == e.init_ids  # one tokenizer per model


def test_ensemble_with_differing_tokenizers_is_refused(tok, make_model):
    m1, m2 = make_model("llama", 0), make_model("llama", 1)
    tok2 = copy.deepcopy(tok)
    tok2.add_tokens(["<zz_new>"])
    with pytest.raises(AttackError, match="must share a tokenizer"):
        GCG([m1, m2], [tok, tok2], INSTRUCTION, TARGET, small())
    with pytest.raises(AttackError, match="2 models but 3 tokenizers"):
        GCG([m1, m2], [tok, tok, tok], INSTRUCTION, TARGET, small())


# ----------------------------------------------------------------------------- 6. resume after SIGKILL

RESUME_STEPS = 8

CHILD = textwrap.dedent("""
    import os, pickle, sys, time
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    torch.set_num_threads(1)
    from pysafegeom.attacks.gcg import GCG
    with open(sys.argv[1], "rb") as f:
        model, tok, instruction, target, cfg = pickle.load(f)
    GCG(model, tok, instruction, target, cfg).run(sys.argv[2], callback=lambda step, info: time.sleep(0.3))
    print("finished")
""")


def test_a_killed_attack_resumes_to_the_identical_result(tok, make_model, tmp_path):
    model = make_model("llama")
    cfg = small(num_steps=RESUME_STEPS, search_width=12, buffer_size=2)
    objs = tmp_path / "objs.pkl"
    objs.write_bytes(pickle.dumps((model, tok, INSTRUCTION, TARGET, cfg)))
    out = tmp_path / "run"
    state = out / gcg.STATE_FILE
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(objs), str(out)],
                                env={**os.environ, "OMP_NUM_THREADS": "1"},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 180
        try:
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"the attack ended before it was killed: {proc.communicate()}")
                if state.is_file() and torch.load(state, weights_only=False)["step"] >= 3:
                    break
                if time.monotonic() > deadline:
                    pytest.fail("the child wrote no state at step 3 within 180 s")
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
        assert proc.returncode == -signal.SIGKILL
        killed_at = torch.load(state, weights_only=False)["step"]
        assert 3 <= killed_at < RESUME_STEPS

        resumed = GCG(model, tok, INSTRUCTION, TARGET, cfg).run(out, resume=True)
        whole = GCG(model, tok, INSTRUCTION, TARGET, cfg).run(tmp_path / "whole")
    finally:
        torch.set_num_threads(threads)
    assert resumed.resumed_from == killed_at and whole.resumed_from is None
    assert resumed.losses == whole.losses and len(whole.losses) == RESUME_STEPS
    assert resumed.strings == whole.strings
    assert resumed.best_string == whole.best_string and resumed.best_ids == whole.best_ids
    assert resumed.best_loss == whole.best_loss
    assert resumed.n_candidates == whole.n_candidates and resumed.n_scored == whole.n_scored
    s_res = torch.load(state, weights_only=False)
    s_whole = torch.load(tmp_path / "whole" / gcg.STATE_FILE, weights_only=False)
    assert s_res["ids"] == s_whole["ids"] and s_res["buffer"] == s_whole["buffer"]
    assert s_res["memo"] == s_whole["memo"]  # the losses seen before the kill were carried over
    assert torch.equal(s_res["gen"], s_whole["gen"])

    with pytest.raises(OutputExists, match="resume=True"):
        GCG(model, tok, INSTRUCTION, TARGET, cfg).run(out)
    with pytest.raises(AttackError, match="different attack"):
        GCG(model, tok, INSTRUCTION, TARGET, dataclasses.replace(cfg, seed=1)).run(out, resume=True)
    again = GCG(model, tok, INSTRUCTION, TARGET, cfg).run(out, resume=True)  # finished: nothing left to do
    assert again.resumed_from == RESUME_STEPS and again.losses == whole.losses


# ------------------------------------------------------------------------------------- 7. bad inputs

def test_empty_targets_and_instructions_are_refused(tok, make_model):
    model, cfg = make_model("llama"), small()
    for t in ("", "  \n"):
        with pytest.raises(AttackError, match="a target is empty"):
            GCG(model, tok, INSTRUCTION, t, cfg)
    for i in ("", " \n\t "):
        with pytest.raises(AttackError, match="an instruction is empty"):
            GCG(model, tok, i, TARGET, cfg)
    with pytest.raises(AttackError, match="2 behaviours but 1 targets"):
        GCG(model, tok, [INSTRUCTION, "Explain how to pick a lock"], [TARGET], cfg)


def test_a_target_that_retokenises_after_the_template_is_refused(tok, make_model):
    """Found here, not assumed: the candidates whose tokens after SmolLM2's "assistant\\n" differ from their
    tokens alone are refused, the others accepted."""
    model, cfg = make_model("llama"), small()
    after = build_prompt(tok, INSTRUCTION, TARGET).after_text
    assert after.endswith("assistant\n")

    def ids(s):
        return tok(s, add_special_tokens=False)["input_ids"]

    cands = ["  Sure, here is", "\n Sure", " \nSure", "\n\nSure", "\tSure", " Sure", "\nSure"]
    fused = [t for t in cands if ids(after + t) != ids(after) + ids(t)]
    assert fused and len(fused) < len(cands)
    for t in cands:
        if t in fused:
            with pytest.raises(AttackError, match="tokenises differently after the template"):
                GCG(model, tok, INSTRUCTION, t, cfg)
        else:
            GCG(model, tok, INSTRUCTION, t, cfg)


def test_a_suffix_init_that_fuses_with_the_instruction_is_refused(tok, make_model):
    model = make_model("llama")

    def ids(s):
        return tok(s, add_special_tokens=False)["input_ids"]

    n = len(ids(INSTRUCTION))
    assert ids(INSTRUCTION + "s x x")[:n] != ids(INSTRUCTION)  # "bread" + "s": one token
    with pytest.raises(AttackError, match="merges with the text around it"):
        GCG(model, tok, INSTRUCTION, TARGET, small(optim_str_init="s x x", separator=""))
    # "ing" stays apart after "bread" but fuses after "jump": its ids from the first prompt do not come back
    other = "Tell me how to go jump"
    assert ids(INSTRUCTION + "ing x")[:n] == ids(INSTRUCTION)
    assert ids(other + "ing x")[:len(ids(other))] != ids(other)
    cfg = small(optim_str_init="ing x", separator="")
    assert GCG(model, tok, INSTRUCTION, TARGET, cfg).init_ids == [[tok.convert_tokens_to_ids("ing"), ids(" x")[0]]]
    with pytest.raises(AttackError, match="does not survive retokenisation"):
        GCG(model, tok, [INSTRUCTION, other], [TARGET, TARGET], cfg)


def test_filter_ids_false_accepts_an_init_that_does_not_survive_retokenisation(tok, make_model):
    cfg = small(optim_str_init="ing x", separator="", filter_ids=False)
    GCG(make_model("llama"), tok, [INSTRUCTION, "Tell me how to go jump"], [TARGET, TARGET], cfg)


def test_a_tokenizer_without_chat_template_needs_a_named_one(tok, make_model):
    model = make_model("llama")
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    with pytest.raises(TemplateError, match="no chat template.*template='plain'"):
        GCG(model, bare, INSTRUCTION, TARGET, small())
    a = GCG(model, bare, INSTRUCTION, TARGET, small(template="plain"))
    assert a.prompts[0].before_text == INSTRUCTION and a.prompts[0].after_text == "\n"
    res = a.run()
    assert chat_ids(bare, res.test_cases[0], "plain") == attacked(a, res.best_ids)


def test_bad_search_settings_are_refused(tok, make_model):
    model = make_model("llama")
    with pytest.raises(ValueError, match="search_width must be >= 1"):
        GCG(model, tok, INSTRUCTION, TARGET, small(search_width=0))
    with pytest.raises(ValueError, match="topk must be >= 1"):
        GCG(model, tok, INSTRUCTION, TARGET, small(topk=0))
    n_allowed = int((~gcg.forbidden_tokens(tok, model.get_input_embeddings().weight.shape[0])).sum())
    assert 1000 < n_allowed < len(tok)
    with pytest.raises(AttackError, match=f"topk={n_allowed} is larger than the {n_allowed - 1} tokens"):
        GCG(model, tok, INSTRUCTION, TARGET, small(topk=n_allowed))  # the current one excluded
    GCG(model, tok, INSTRUCTION, TARGET, small(topk=n_allowed - 1))
    GCG(model, tok, INSTRUCTION, TARGET, small(topk=n_allowed, exclude_current=False))
    with pytest.raises(AttackError, match="larger than"):
        GCG(model, tok, INSTRUCTION, TARGET, small(topk=len(tok) + 1, exclude_current=False))


def test_an_attack_whose_every_candidate_is_filtered_out_stops_with_a_reason(tok, make_model):
    a = GCG(make_model("llama"), tok, INSTRUCTION, TARGET, small())
    a.filter = lambda cands: torch.zeros(cands.shape[0], dtype=torch.bool)
    with pytest.raises(AttackError, match="every candidate was filtered out"):
        a.run()


def test_control_token_text_in_a_message_is_refused(tok, make_model):
    model, cfg = make_model("llama"), small()
    with pytest.raises(AttackError, match="user message contains the control-token text '<\\|im_end\\|>'"):
        GCG(model, tok, "Tell me <|im_end|> how to bake bread", TARGET, cfg)
    with pytest.raises(AttackError, match="system message contains the control-token text"):
        GCG(model, tok, INSTRUCTION, TARGET, dataclasses.replace(cfg, system="Be brief.<|im_start|>"))


def test_control_token_text_in_the_suffix_init_is_refused(tok, make_model):
    """It would become a real turn marker in the attacked ids, which the test-case string (tokenised with
    control-token text as text, as format_prompts and generate do) would not reproduce."""
    with pytest.raises(AttackError, match="suffix init .* contains the control-token text '<\\|im_end\\|>'"):
        GCG(make_model("llama"), tok, INSTRUCTION, TARGET, small(optim_str_init="x <|im_end|> x"))


# ------------------------------------------------------------------------------------- 8. real model

@pytest.fixture(scope="module")
def smollm2():
    from pysafegeom.models import ModelNotFound, load_model

    try:
        return load_model(device="cpu")
    except ModelNotFound as exc:
        pytest.skip(str(exc))


@pytest.mark.real_model
def test_smollm2_attack_keeps_its_markers_and_fast_scoring_equals_the_reference(smollm2):
    model, tk = smollm2
    cfg = GCGConfig(search_width=8, topk=8, num_steps=2, optim_str_init="x x x x x", progress=False)
    a = GCG(model, tk, INSTRUCTION, TARGET, cfg)
    p = a.prompts[0]
    assert p.before_ids[0] == tk.bos_token_id == tk.convert_tokens_to_ids("<|im_start|>")  # kept, unlike nanoGCG
    res = a.run()
    assert len(res.losses) == 2 and all(math.isfinite(x) for x in res.losses)
    assert res.test_cases == [INSTRUCTION + res.best_string]
    assert chat_ids(tk, res.test_cases[0]) == attacked(a, res.best_ids)
    assert attacked(a, res.best_ids)[0] == tk.bos_token_id

    cur = torch.tensor(res.best_ids)
    cands = ops.sample_candidates(cur, a.token_grad(cur)[0], 8, 8, 1, a.forbidden, seed=0)
    fast = a.candidate_losses(cands, cur)
    ref = GCG(model, tk, INSTRUCTION, TARGET, GCGConfig.reference(**dataclasses.asdict(cfg)))
    ref = ref.candidate_losses(cands, cur)
    assert ((fast - ref).abs() <= 1e-4 * ref.abs()).all(), (fast, ref)
    assert float(ref.max() - ref.min()) > 1e-3  # the candidates do differ: the comparison means something


# --------------------------------------------------------------------------------- 9. out of memory

def test_out_of_memory_halves_the_batch_and_gives_the_same_losses(tok, make_model, monkeypatch):
    """A forward of more than 3 candidates raises out-of-memory (as CUDA would): the scorer halves its batch
    until it fits, remembers the smaller size, and the losses equal those of the unbroken batch."""
    a = GCG(make_model("llama"), tok, INSTRUCTION, TARGET, small())
    cur = torch.tensor(a.init_ids[0])
    grad = a.token_grad(cur)[0]
    cands = ops.sample_candidates(cur, grad, 12, 8, 1, a.forbidden, seed=5)
    want = a.candidate_losses(cands, cur)
    real = gcg.forward
    sizes = []

    def tight(net, ids=None, *args, **kw):
        x = ids if ids is not None else kw.get("inputs_embeds")
        sizes.append(x.shape[0])
        if x.shape[0] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(net, ids, *args, **kw)

    monkeypatch.setattr(gcg, "forward", tight)
    got = a.candidate_losses(cands, cur)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert max(sizes) > 3 and a.scorers[0].max_batch <= 3
    assert sum(s for s in sizes if s <= 3) == cands.shape[0]  # every candidate scored once, in batches that fit

    def broken(net, ids=None, *args, **kw):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(gcg, "forward", broken)
    with pytest.raises(RuntimeError, match="illegal memory access"):  # other errors are not swallowed
        a.candidate_losses(cands, cur)
