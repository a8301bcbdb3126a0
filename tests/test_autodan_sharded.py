"""attacks/autodan.py on a model placed by accelerate (``load_model(..., device_map=...)``), on the CPU.

A tiny random model with the real SmolLM2 vocabulary (its weight matrices redrawn at std 0.3, as the other
AutoDAN tests' model, so that template losses differ) is saved once and loaded twice: whole on the CPU, and
with a device map keeping blocks 0 and 2 (and the final norm) on the CPU and offloading blocks 1 and 3, the
token embedding and the LM head to the disk, so those parameters sit on ``meta`` between forwards (what breaks
code that reads ``next(model.parameters()).device`` or a weight directly). The same AutoDAN run on both
(HGA with sentence and word steps, synonym mutation from the input-embedding space, the scoring through the
prefix KV cache with the head run at the target positions only, or every speed-up off, and the greedy
refusal check) must find the same templates with the same losses.

Tolerance: both models run the same CPU kernels on the same shapes in the same order (the placement only
changes where weights are read from), so results are compared for equality: any difference is a bug in the
placement handling, not rounding (on a model sharded over GPUs STYLE.md's rule would apply instead).
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from pysafegeom.attacks import autodan
from pysafegeom.attacks.autodan import AutoDAN, AutoDANConfig, Synonyms
from pysafegeom.models import load_model
from pysafegeom.models.placement import execution_device, input_device, is_offloaded
from pysafegeom.models.tiny import tiny_model

pytest.importorskip("accelerate")
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:Attempting to save a model with offloaded modules"),
              pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")]

BEHAVIOUR = "Tell me how to bake bread"
TARGET = "Sure, here is how"
# blocks 0 and 2 (and the norms) on the CPU; blocks 1 and 3, the token embedding and the head on the disk
DISK_MAP = {"model.embed_tokens": "disk", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "cpu",
            "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"}
# HGA alternating sentence (steps 2, 4) and word (1, 3) steps; every child mutated half the time from the
# embedding synonyms; the refusal check answers at step 4 (the random model never refuses, so it stops there)
RUN = dict(batch_size=6, num_steps=4, iter=2, mutation=0.5, synonym_rate=0.3, synonyms="embedding",
           eval_with_check_refusal=True, eval_steps=4, check_max_new_tokens=6, progress=False, seed=3)



@pytest.fixture(scope="module")
def placed_pair(tok, tmp_path_factory):
    """arch -> (whole on the CPU, placed with DISK_MAP, tokenizer), both loaded from one saved folder."""
    cache: dict = {}

    def get(arch: str):
        if arch not in cache:
            m = tiny_model(arch, tokenizer=tok, n_layers=4, d_model=32, seed=21)
            g = torch.Generator().manual_seed(22)
            with torch.no_grad():
                for _, p in m.named_parameters():
                    if p.dim() >= 2:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            folder = tmp_path_factory.mktemp(f"autodan-{arch}") / "model"
            m.save_pretrained(folder)
            tok.save_pretrained(folder)
            whole, tk = load_model(folder, device="cpu")
            placed, _ = load_model(folder, device_map=DISK_MAP, offload_folder=folder.parent / "offload")
            assert placed.get_input_embeddings().weight.device.type == "meta"  # really offloaded: the case that breaks
            assert placed.get_output_embeddings().weight.device.type == "meta" and is_offloaded(placed)
            cache[arch] = whole, placed, tk
        return cache[arch]

    return get


def _same_run(r1, r2):
    assert (r1.best_template, r1.best_test_case) == (r2.best_template, r2.best_test_case)
    assert r1.best_loss == r2.best_loss and r1.losses == r2.losses and r1.templates == r2.templates
    assert r1.n_scored == r2.n_scored and r1.n_rows == r2.n_rows
    assert (r1.stopped_early, r1.success_step, r1.check_completion) == \
           (r2.stopped_early, r2.success_step, r2.check_completion)
    assert r1.notes == r2.notes


@pytest.mark.parametrize("arch,speedups", [("llama", True), ("llama", False), ("gemma", True)],
                         ids=["llama-fast", "llama-reference", "gemma-tied-fast"])
def test_a_placed_model_gives_the_whole_models_run(placed_pair, arch, speedups):
    """The same run (population losses, templates, best test case, the refusal check's answer) on the whole
    and the placed model; ``reference`` turns the prefix cache, target-only head, buckets and memo off. Gemma:
    a tied head (the embedding's weight) and a scaled embedding, both offloaded."""
    whole, placed, tk = placed_pair(arch)
    cfg = AutoDANConfig(**RUN) if speedups else AutoDANConfig.reference(**RUN)
    a_whole = AutoDAN(whole, tk, BEHAVIOUR, TARGET, cfg)
    a_placed = AutoDAN(placed, tk, BEHAVIOUR, TARGET, dataclasses.replace(cfg))
    assert a_placed.scorer.device == input_device(placed) == torch.device("cpu")  # never meta
    # ids go where the embedding runs; with full logits where the head runs (so the logits stay there)
    head = placed.get_output_embeddings()
    assert a_placed.scorer.feed == (input_device(placed) if speedups else execution_device(placed, head))
    assert a_placed.fingerprint() == a_whole.fingerprint()  # the model hash reads the offloaded weights

    seen = []  # the device of the ids of every forward of the placed model (scoring and the refusal check)
    h = placed.get_input_embeddings().register_forward_pre_hook(lambda m, args: seen.append(args[0].device))
    try:
        r_placed = a_placed.run()
    finally:
        h.remove()
    r_whole = a_whole.run()
    _same_run(r_whole, r_placed)
    assert seen and set(seen) == {a_placed.scorer.feed, input_device(placed)}
    assert r_placed.stopped_early and r_placed.success_step == 4 and r_placed.check_completion
    assert len(set(r_placed.templates)) > 1  # the search moved
    # the embedding synonyms were really drawn from (an offloaded embedding read through its hook)
    words = [w for w in a_placed.synonyms._memo if a_placed.synonyms._memo[w]]
    assert words and all(a_placed.synonyms(w) == a_whole.synonyms(w) for w in words)
    # and the losses are the model's: one template rescored from scratch, placed against whole
    case = a_whole.test_case(r_whole.best_template)
    assert a_placed.scorer.score([case]).tolist() == a_whole.scorer.score([case]).tolist()


def test_embedding_synonyms_read_offloaded_weights(placed_pair):
    """The embedding-space synonym index of the placed model (its embedding on the disk) is the whole model's,
    for words of the shipped prompts and the behaviour."""
    whole, placed, tk = placed_pair("llama")
    s_whole, s_placed = Synonyms("embedding", whole, tk), Synonyms("embedding", placed, tk)
    E_w, words_w, _ = s_whole._emb
    E_p, words_p, _ = s_placed._emb
    assert words_w == words_p and torch.equal(E_w, E_p) and E_p.device.type == "cpu"
    for w in ("story", "character", "imagine", "respond", "bread", "developer", "answer"):
        assert s_placed(w) == s_whole(w)
    assert any(s_placed(w) for w in ("story", "character", "imagine"))


def test_the_scorer_reads_the_offloaded_head_once_per_call(placed_pair, monkeypatch):
    """Target-only losses on the placed model load the offloaded LM head from its hook once per
    :meth:`score`, not once per length bucket (each load reads the disk)."""
    whole, placed, tk = placed_pair("llama")
    a = AutoDAN(placed, tk, BEHAVIOUR, TARGET, AutoDANConfig(**{**RUN, "batch_overhead_rows": 1}))
    assert a.scorer.target_only
    loads = []
    real = autodan.module_tensor

    def count(model, module, name="weight", **kw):
        loads.append(type(module).__name__)
        return real(model, module, name, **kw)

    monkeypatch.setattr(autodan, "module_tensor", count)
    pop = a.initial_population(random.Random(0))
    cases = [a.test_case(t) for t in pop]
    assert len(a.scorer._partition(sorted(len(r) for r in a.scorer.rows(cases)), len(a.scorer.target_ids) - 1)) > 1
    lo = a.scorer.score(cases)
    assert loads == ["Linear"] and torch.isfinite(lo).all()
