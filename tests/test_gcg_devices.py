"""attacks/gcg.py + attacks/multidevice.py: GCG on a model dispatched by accelerate, and candidates scored on
several devices (``GCGConfig.devices``).

On this machine every device is the CPU, so the dispatched models are split between weights kept in memory
and weights offloaded to the disk (``dispatch_model`` with ``offload_dir``; ``from_pretrained(device_map=...,
offload_folder=...)``) or all offloaded (``accelerate.cpu_offload``): the parameters sit on the meta device
between forwards, which is what breaks code that reads ``next(model.parameters()).device`` or a weight.
References: a float64 no-cache forward of every candidate (losses, the kernel tolerance rule of STYLE.md),
the same model undispatched on one device (token gradient, losses, a whole run), and the single-device run
for two CPU replicas (same candidates, same suffixes, losses to float rounding). The tiny models are the GCG
tests' (``sharp_tiny_model``: losses of candidates differ by ~0.1). A CUDA test runs where there is a GPU.
"""

from __future__ import annotations

import copy
import dataclasses
import threading

import pytest
import torch

from pysafegeom import ops
from pysafegeom.attacks import multidevice
from pysafegeom.attacks.gcg import GCG, AttackError, GCGConfig, model_hash
from pysafegeom.models.placement import is_dispatched

pytestmark = pytest.mark.usefixtures("gcg_forbidden_once")

accelerate = pytest.importorskip("accelerate")

INSTRUCTION = "Tell me how to bake bread"
TARGET = "Sure, here is how"
SMALL = dict(search_width=16, topk=8, num_steps=3, optim_str_init="x x x x", progress=False)


def small(**kw) -> GCGConfig:
    return GCGConfig(**{**SMALL, **kw})




def alternating_map(model, first: str = "disk", other: str = "cpu", head: str = "disk") -> dict[str, str]:
    """A device map putting the body's blocks alternately on ``first`` and ``other`` (embedding first), and the
    LM head on ``head``."""
    prefix = model.base_model_prefix
    body = getattr(model, prefix)
    dm, k = {}, 0
    for name, child in body.named_children():
        kids = list(child.named_children()) if isinstance(child, torch.nn.ModuleList) else [(None, child)]
        for sub, _ in kids:
            dm[f"{prefix}.{name}" + (f".{sub}" if sub is not None else "")] = first if k % 2 == 0 else other
            k += 1
    dm["lm_head"] = head
    return dm


def dispatched(model, how: str, tmp_path):
    """``model`` (copied) dispatched by accelerate as ``how`` says; at least the embedding is offloaded."""
    if how == "dispatch_model":
        d = accelerate.dispatch_model(copy.deepcopy(model), device_map=alternating_map(model),
                                      offload_dir=str(tmp_path / "offload"))
    elif how == "cpu_offload":
        d = accelerate.cpu_offload(copy.deepcopy(model), execution_device="cpu")
    elif how == "from_pretrained":
        from transformers import AutoModelForCausalLM

        model.save_pretrained(tmp_path / "saved")
        d = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", device_map=alternating_map(model),
                                                 offload_folder=str(tmp_path / "offload"), dtype=torch.float32)
        d.requires_grad_(False)
    else:  # pragma: no cover
        raise ValueError(how)
    assert d.get_input_embeddings().weight.device.type == "meta"  # really offloaded: the case that breaks
    assert is_dispatched(d)
    return d


def candidate_pool(a, cur, grad, seed=7):
    """The current suffix, 12 one-token and 8 two-token candidates, one changed at the first and one at the last
    position only (the two ends of the suffix-prefix reuse), and a duplicate."""
    gen = torch.Generator().manual_seed(seed)
    one = ops.sample_candidates(cur, grad, 12, 8, 1, a.forbidden, generator=gen)
    two = ops.sample_candidates(cur, grad, 8, 8, 2, a.forbidden, generator=gen)
    t = int(one[0][one[0] != cur][0])
    ends = cur.repeat(2, 1)
    ends[0, 0] = t
    ends[1, -1] = t
    return torch.cat([cur[None], one, two, ends, two[:1]])


def brute_losses(model64, prompt, rows):
    """float64 ``[N]``: each row's full no-cache forward, the mean CE of the target tokens."""
    T = len(prompt.target_ids)
    out = []
    for r in rows.tolist():
        ids = prompt.before_ids + r + prompt.after_ids + prompt.target_ids
        with torch.no_grad():
            logits = model64(input_ids=torch.tensor([ids])).logits[0, len(ids) - T - 1:len(ids) - 1]
        out.append(torch.nn.functional.cross_entropy(logits, torch.tensor(prompt.target_ids)))
    return torch.stack(out)


# ------------------------------------------------------------------------- 1. a model dispatched by accelerate

DISPATCHES = [
    pytest.param("llama", "dispatch_model", id="llama-dispatch_model"),
    pytest.param("llama", "cpu_offload", id="llama-cpu_offload"),
    pytest.param("llama", "from_pretrained", id="llama-from_pretrained"),
    pytest.param("gemma", "dispatch_model", id="gemma-dispatch_model"),  # tied head, scaled embedding
    pytest.param("gpt2", "dispatch_model", id="gpt2-dispatch_model"),  # other module names, absolute positions
]


@pytest.mark.parametrize("arch,how", DISPATCHES)
def test_dispatched_model_gives_the_gradient_and_losses_of_the_model_on_one_device(tok, make_model, tmp_path,
                                                                                     arch, how):
    """Token gradient and candidate losses (all exact speed-ups on: prefix KV, target-only head, suffix-prefix
    reuse) on the dispatched model equal those of the same model undispatched, and its losses meet the
    tolerance rule against the float64 brute force (<= 4x the plain fp32 reference's error + 1e-6)."""
    model = make_model(arch)
    disp = dispatched(model, how, tmp_path)
    plain = GCG(model, tok, INSTRUCTION, TARGET, small())
    a = GCG(disp, tok, INSTRUCTION, TARGET, small())
    s = a.scorers[0]
    assert s.target_only and s.device == torch.device("cpu")
    cur = torch.tensor(plain.init_ids[0])
    g_plain, lo_plain = plain.token_grad(cur)
    g, lo = a.token_grad(cur)
    assert s.step_kv[0] is not None  # the suffix-prefix KV, taken from the dispatched gradient pass
    scale = float(g_plain.abs().max())
    assert scale > 0 and float((g - g_plain).abs().max()) <= 1e-5 * scale
    assert abs(lo - lo_plain) <= 1e-5 * abs(lo_plain)

    rows = candidate_pool(plain, cur, g_plain)
    want = brute_losses(copy.deepcopy(model).double(), plain.prompts[0], rows)
    ref = GCG(model, tok, INSTRUCTION, TARGET, GCGConfig.reference(**SMALL))
    e_ref = float((ref.candidate_losses(rows, cur).double() - want).abs().max())
    got = a.candidate_losses(rows, cur)
    got_plain = plain.candidate_losses(rows, cur)
    assert float(want.std()) > 0.02  # the candidates' losses really differ
    assert float((got.double() - want).abs().max()) <= 4 * e_ref + 1e-6
    assert torch.allclose(got, got_plain, rtol=0, atol=1e-5)
    if how != "from_pretrained":  # (a saved and reloaded model's config names its folder)
        assert model_hash(disp) == model_hash(model)


def test_dispatched_model_without_the_target_only_head_matches_too(tok, make_model, tmp_path):
    """With ``target_only_logits=False`` the whole dispatched model runs, with the prefix KV passed through
    accelerate's top-level hook: the same losses as undispatched."""
    model = make_model("llama")
    disp = dispatched(model, "dispatch_model", tmp_path)
    cfg = small(target_only_logits=False)
    plain, a = GCG(model, tok, INSTRUCTION, TARGET, cfg), GCG(disp, tok, INSTRUCTION, TARGET, cfg)
    assert not a.scorers[0].target_only
    cur = torch.tensor(plain.init_ids[0])
    g_plain, _ = plain.token_grad(cur)
    g, _ = a.token_grad(cur)
    assert torch.allclose(g, g_plain, rtol=0, atol=1e-5 * float(g_plain.abs().max()))
    rows = candidate_pool(plain, cur, g_plain)
    assert torch.allclose(a.candidate_losses(rows, cur), plain.candidate_losses(rows, cur), rtol=0, atol=1e-5)


@pytest.mark.parametrize("how", ["dispatch_model", "cpu_offload"])
def test_dispatched_model_runs_the_attack_of_the_model_on_one_device(tok, make_model, tmp_path, how):
    """A seeded run of a few steps (buffer of 2) reaches the same suffixes and losses dispatched or not."""
    model = make_model("llama")
    cfg = small(num_steps=4, buffer_size=2)
    whole = GCG(model, tok, INSTRUCTION, TARGET, cfg).run()
    res = GCG(dispatched(model, how, tmp_path), tok, INSTRUCTION, TARGET, cfg).run()
    assert res.best_ids == whole.best_ids and res.strings == whole.strings
    assert res.n_candidates == whole.n_candidates and res.n_scored == whole.n_scored
    assert res.losses == pytest.approx(whole.losses, rel=0, abs=1e-5)
    assert len(set(whole.strings)) > 1  # the search moved


# ------------------------------------------------------------------------- 2. candidates over several devices

def test_split_shares_cuts_contiguous_shares_of_about_equal_cost():
    g = torch.Generator().manual_seed(0)
    for trial in range(50):
        n_items = int(torch.randint(0, 40, (1,), generator=g))
        costs = (torch.randint(1, 30, (n_items,), generator=g)).tolist()
        n = 1 + trial % 4
        shares = multidevice.split_shares(costs, n)
        assert len(shares) == n
        assert [s for s, _ in shares] == [0] + [e for _, e in shares[:-1]] and shares[-1][1] == n_items
        total = sum(costs)
        for s, e in shares:
            assert sum(costs[s:e]) <= total / n + max(costs, default=0)
    assert multidevice.split_shares([5, 5, 5, 5], 2) == [(0, 2), (2, 4)]
    assert multidevice.split_shares([1, 1, 1, 9], 2) == [(0, 3), (3, 4)]


def test_two_cpu_replicas_score_every_candidate_in_candidate_order_on_two_threads(tok, make_model):
    """``devices=("cpu", "cpu")``: the model and one deep copy each score a share, on a thread each, and the
    losses come back in the candidates' order (elementwise equal to one device's, to float rounding)."""
    model = make_model("llama")
    one = GCG(model, tok, INSTRUCTION, TARGET, small())
    two = GCG(model, tok, INSTRUCTION, TARGET, small(devices=("cpu", "cpu")))
    rs = two.scorers[0]
    assert isinstance(rs, multidevice.ReplicatedScorer) and len(rs.replicas) == 2
    m0, m1 = rs.replicas[0].model, rs.replicas[1].model
    assert m0 is model and m1 is not model and rs.owned == [False, True]
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(m0.parameters(), m1.parameters()))
    cur = torch.tensor(one.init_ids[0])
    g1, lo1 = one.token_grad(cur)
    g2, lo2 = two.token_grad(cur)
    assert torch.equal(g1, g2) and lo1 == lo2  # the gradient runs on the model itself
    assert rs.replicas[1].step_kv[0] is not None  # the copy got the suffix KV for the prefix reuse

    threads: dict[int, set[int]] = {0: set(), 1: set()}
    hooks = [r.model.get_input_embeddings().register_forward_pre_hook(
        lambda mod, args, i=i: threads[i].add(threading.get_ident())) for i, r in enumerate(rs.replicas)]
    try:
        rows = candidate_pool(one, cur, g1)
        rows = rows[torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(3))]
        fed = [r.rows_fed for r in rs.replicas]
        got = two.candidate_losses(rows, cur)
    finally:
        for h in hooks:
            h.remove()
    want = one.candidate_losses(rows, cur)
    assert torch.allclose(got, want, rtol=0, atol=1e-5) and float(want.std()) > 0.02
    assert all(r.rows_fed > f for r, f in zip(rs.replicas, fed))  # both did work
    main = threading.get_ident()
    assert len(threads[0]) == len(threads[1]) == 1 and threads[0] != threads[1] and main not in threads[0] | threads[1]


def test_two_cpu_replicas_run_the_single_device_search(tok, make_model):
    """The same seeded run on one device and on two CPU replicas: the same candidates (counts), the same suffix
    chosen at every step, losses equal to float rounding."""
    model = make_model("llama")
    cfg = small(num_steps=5, search_width=24, buffer_size=2)
    one = GCG(model, tok, INSTRUCTION, TARGET, cfg).run()
    two = GCG(model, tok, INSTRUCTION, TARGET, dataclasses.replace(cfg, devices=("cpu", "cpu"))).run()
    assert two.best_ids == one.best_ids and two.strings == one.strings
    assert two.n_candidates == one.n_candidates and two.n_scored == one.n_scored  # (n_rows: batched per share)
    assert two.losses == pytest.approx(one.losses, rel=0, abs=1e-5)
    assert len(set(one.strings)) > 1
    assert two.config["devices"] == ("cpu", "cpu")


def test_given_replicas_are_used_and_checked(tok, make_model):
    model = make_model("llama")
    twin = copy.deepcopy(model)
    a = GCG(model, tok, INSTRUCTION, TARGET, small(devices=("cpu", "cpu")), replicas=[twin, model])
    assert [r.model for r in a.scorers[0].replicas] == [twin, model] and a.scorers[0].owned == [False, False]
    one = GCG(model, tok, INSTRUCTION, TARGET, small())
    cur = torch.tensor(one.init_ids[0])
    rows = candidate_pool(one, cur, one.token_grad(cur)[0])
    a.token_grad(cur)
    assert torch.allclose(a.candidate_losses(rows, cur), one.candidate_losses(rows, cur), rtol=0, atol=1e-5)

    other = make_model("qwen2")
    with pytest.raises(AttackError, match="other weights"):
        GCG(model, tok, INSTRUCTION, TARGET, small(devices=("cpu", "cpu")), replicas=[model, other])
    with pytest.raises(AttackError, match="2 replicas for 3 devices"):
        GCG(model, tok, INSTRUCTION, TARGET, small(devices=("cpu",) * 3), replicas=[model, twin])
    with pytest.raises(AttackError, match="without config.devices"):
        GCG(model, tok, INSTRUCTION, TARGET, small(), replicas=[model])
    meta = copy.deepcopy(model).to("meta")
    with pytest.raises(AttackError, match="not wholly loaded on cpu"):
        GCG(model, tok, INSTRUCTION, TARGET, small(devices=("cpu", "cpu")), replicas=[model, meta])


def test_a_dispatched_model_scores_its_candidates_on_given_replicas(tok, make_model, tmp_path):
    """The gradient on a dispatched (offloaded, tied) model, the candidates on two loaded copies: the prefix and
    suffix KV move from the offloaded layers' devices to the replicas', and the run is the plain model's."""
    model = make_model("gemma")
    cfg = small(num_steps=3)
    whole = GCG(model, tok, INSTRUCTION, TARGET, cfg).run()
    twins = [multidevice.copy_to(model, torch.device("cpu")) for _ in range(2)]
    assert twins[0].lm_head.weight is twins[0].get_input_embeddings().weight  # the copy keeps the tie
    a = GCG(dispatched(model, "dispatch_model", tmp_path), tok, INSTRUCTION, TARGET,
            dataclasses.replace(cfg, devices=("cpu", "cpu")), replicas=twins)
    res = a.run()
    assert res.best_ids == whole.best_ids and res.losses == pytest.approx(whole.losses, rel=0, abs=1e-5)
    assert all(r.rows_fed > 0 for r in a.scorers[0].replicas) and a.scorers[0].main.rows_fed == 0


def test_refresh_copies_changed_weights_into_the_replicas(tok, make_model):
    """After the model's weights change (R2D2 trains between steps), ``refresh()`` puts them into the copies: the
    losses equal a fresh one-device attack on the changed model."""
    model = copy.deepcopy(make_model("llama"))
    a = GCG(model, tok, INSTRUCTION, TARGET, small(devices=("cpu", "cpu")))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.25)
    a.refresh()
    copy_model = a.scorers[0].replicas[1].model
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), copy_model.parameters()))
    fresh = GCG(model, tok, INSTRUCTION, TARGET, small())
    cur = torch.tensor(fresh.init_ids[0])
    rows = candidate_pool(fresh, cur, fresh.token_grad(cur)[0])
    a.token_grad(cur)
    assert torch.allclose(a.candidate_losses(rows, cur), fresh.candidate_losses(rows, cur), rtol=0, atol=1e-5)


class _Stop(Exception):
    pass


def test_a_run_started_on_one_device_resumes_on_two(tok, make_model, tmp_path):
    """``devices`` is not part of the state's identity: a run stopped after step 2 on one device continues on
    two CPU replicas to the uninterrupted single-device result."""
    model = make_model("llama")
    cfg = small(num_steps=5, search_width=24, buffer_size=2)
    out = tmp_path / "run"

    def stop(step, info):
        if step == 2:
            raise _Stop

    with pytest.raises(_Stop):
        GCG(model, tok, INSTRUCTION, TARGET, cfg).run(out, callback=stop)
    two = GCG(model, tok, INSTRUCTION, TARGET, dataclasses.replace(cfg, devices=("cpu", "cpu")))
    assert two.fingerprint() == GCG(model, tok, INSTRUCTION, TARGET, cfg).fingerprint()
    resumed = two.run(out, resume=True)
    whole = GCG(model, tok, INSTRUCTION, TARGET, cfg).run()
    assert resumed.resumed_from == 2
    assert resumed.best_ids == whole.best_ids and resumed.strings == whole.strings
    assert resumed.losses == pytest.approx(whole.losses, rel=0, abs=1e-5)


def test_bad_devices_are_refused(tok, make_model, tmp_path):
    model = make_model("llama")
    for devices, match in [((), "devices is empty"), ("cpu", "a tuple of device names"),
                           (("gpu",), "not a device name torch knows"), (("meta",), "holds no data"),
                           ((0,), "must be a device name"), (["cpu", 7], "devices\\[1\\]")]:
        with pytest.raises((AttackError, TypeError), match=match):
            GCG(model, tok, INSTRUCTION, TARGET, small(devices=devices))
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(AttackError, match=f"torch sees {n} CUDA device"):
        GCG(model, tok, INSTRUCTION, TARGET, small(devices=("cpu", f"cuda:{n}")))
    with pytest.raises(AttackError, match="cannot be copied whole"):
        GCG(dispatched(model, "cpu_offload", tmp_path), tok, INSTRUCTION, TARGET, small(devices=("cpu", "cpu")))
    assert GCGConfig.from_dict({**small().to_dict(), "devices": ["cpu", "cpu"]}).devices == ("cpu", "cpu")


# ------------------------------------------------------------------------------------------------ 3. CUDA

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_dispatched_and_replicated_runs_match_one_device(tok, make_model, tmp_path):
    """On a GPU: the model dispatched over every GPU with blocks offloaded to the CPU (weights streamed in), and
    candidates split over replicas on every GPU, run the search of the model on cuda:0."""
    model = copy.deepcopy(make_model("llama")).to("cuda:0")
    gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    cfg = small(num_steps=4, buffer_size=2)
    whole = GCG(model, tok, INSTRUCTION, TARGET, cfg).run()
    cpu_model = make_model("llama")
    dm = alternating_map(cpu_model, first="cpu", other=gpus[-1], head=gpus[0])
    disp = accelerate.dispatch_model(copy.deepcopy(cpu_model), device_map=dm, main_device=gpus[0])
    res = GCG(disp, tok, INSTRUCTION, TARGET, cfg).run()
    assert res.best_ids == whole.best_ids and res.losses == pytest.approx(whole.losses, rel=0, abs=1e-4)
    devices = tuple(gpus * 2) if len(gpus) == 1 else tuple(gpus)
    rep = GCG(model, tok, INSTRUCTION, TARGET, dataclasses.replace(cfg, devices=devices)).run()
    assert rep.best_ids == whole.best_ids and rep.losses == pytest.approx(whole.losses, rel=0, abs=1e-4)
