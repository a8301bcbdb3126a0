"""Models placed over several devices with accelerate (``load_model(..., device_map=...)``), on the CPU.

A tiny random Llama (the real SmolLM2 vocabulary) is loaded twice from one folder: whole on the CPU, and with a
device map that keeps some blocks on the CPU and offloads the others, the token embedding and the head to the
disk (their parameters live on ``meta``; accelerate's hooks load them for each forward). Everything the protocol
does with a model (capture, ablation and addition hooks in every position mode, weight orthogonalisation and
its export, greedy generation with finished rows dropped, carrier selection) must give the same numbers on both.

Tolerance: both models run the same CPU kernels on the same shapes in the same order (the offload only moves
where the weights are read from), so the results are compared for equality (``rtol=atol=0``): any difference
is a bug in the placement handling, not rounding. On a model sharded over GPUs the usual rule would apply.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from pysafegeom.errors import InvalidArgument, InvalidType
from pysafegeom.generation import generate
from pysafegeom.interventions import ablate, add, export_orthogonalized, orthogonalize
from pysafegeom.models import ModelAdapter, load_model, tiny_model
from pysafegeom.models.placement import input_device, is_offloaded, is_sharded, module_tensor
from pysafegeom.prompts import encode_prompts, format_prompts
from pysafegeom.protocol.capture import capture
from validate_helpers import assert_clear

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:Attempting to save a model with offloaded modules"),
              pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")]
EXACT = dict(rtol=0.0, atol=0.0)
HARMFUL = ["Tell me how to steal a car", "How do I pick a lock without a key?", "Write a threatening letter"]
HARMLESS = ["Tell me how to bake bread", "How do I tie a bowline knot?", "Write a letter to my aunt"]
PROMPTS = HARMFUL[:2] + HARMLESS[:2] + ["Hi"]
D, N_LAYERS = 32, 4
# blocks 0 and 2 (and the norms) on the CPU; blocks 1 and 3, the token embedding and the head on the disk
DISK_MAP = {"model.embed_tokens": "disk", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "cpu",
            "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"}



def _save(model, tok, folder):
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folder(tok, tmp_path_factory):
    """A tiny Llama with fresh random weights (a seed of its own, and non-zero RMSNorm scales)."""
    m = tiny_model("llama", tokenizer=tok, n_layers=N_LAYERS, d_model=D, seed=11)
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    return _save(m, tok, tmp_path_factory.mktemp("sharded") / "llama")


@pytest.fixture(scope="module")
def pair(folder, tmp_path_factory):
    """(whole on the CPU, placed with DISK_MAP), loaded from one folder; and the offload folder."""
    whole, tk = load_model(folder, device="cpu")
    off = tmp_path_factory.mktemp("offload")
    placed, _ = load_model(folder, device_map=DISK_MAP, offload_folder=off)
    return whole, placed, tk, off


def _vector(seed, shape=(D,)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _logits(model, fb):
    return model(input_ids=fb.input_ids, attention_mask=fb.attention_mask).logits


def _gen(model, tk, **kw):
    return generate(model, tk, PROMPTS, max_new_tokens=6, batch_size=8, progress=False, return_details=True, **kw)


def _files_digest(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- loading --------------------------------------------------------------------------------------------

def test_the_placement_is_recorded_and_the_forward_matches(pair):
    whole, placed, tk, _ = pair
    assert placed.hf_device_map == DISK_MAP
    assert is_sharded(placed) and is_offloaded(placed) and not is_sharded(whole)
    ad = ModelAdapter(placed)
    assert ad.embed.weight.device.type == "meta" and ad.layers[0].self_attn.o_proj.weight.device.type == "cpu"
    assert ad.device == input_device(placed) == torch.device("cpu")  # never meta
    torch.testing.assert_close(module_tensor(placed, ad.embed), ModelAdapter(whole).embed.weight, **EXACT)
    fb = format_prompts(tk, PROMPTS)
    torch.testing.assert_close(_logits(placed, fb), _logits(whole, fb), **EXACT)
    assert not placed.training and not any(p.requires_grad for p in placed.parameters())


def test_a_lora_adapter_is_merged_then_placed(folder, tok, tmp_path):
    peft = pytest.importorskip("peft")
    base, tk = load_model(folder, device="cpu")
    fb = format_prompts(tk, PROMPTS)
    before = _logits(base, fb)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj", "down_proj"],
                                                     task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:  # B starts at zero: give the adapter something to merge
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    adapter = tmp_path / "adapter"
    lora.save_pretrained(adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(folder)}))
    whole, _ = load_model(adapter, device="cpu")
    dm = {**DISK_MAP, "model.layers.0": "disk", "model.layers.1": "cpu"}
    placed, _ = load_model(adapter, device_map=dm, offload_folder=tmp_path / "off")
    assert placed.hf_device_map == dm and is_offloaded(placed)
    ref = _logits(whole, fb)
    assert (ref - before).abs().max() > 1e-3  # the merge changed the model
    torch.testing.assert_close(_logits(placed, fb), ref, **EXACT)
    # a placement mode: accelerate fills the host budget (here too small for the 6 MB head), the rest goes to the disk
    placed, _ = load_model(adapter, device_map="sequential", max_memory={"cpu": "7MB"}, offload_folder=tmp_path / "o2")
    assert "disk" in placed.hf_device_map.values() and is_offloaded(placed), placed.hf_device_map
    torch.testing.assert_close(_logits(placed, fb), ref, **EXACT)


# --- capture and hooks ----------------------------------------------------------------------------------

def test_capture_matches(pair):
    whole, placed, tk, _ = pair
    sets = {"harmful": HARMFUL, "harmless": HARMLESS}
    kw = dict(refusal_tokens=[57, 330], keep_positions="all", batch_size=2, progress=False)
    a, b = capture(whole, tk, sets, **kw), capture(placed, tk, sets, **kw)
    assert a.sums.abs().max() > 0
    torch.testing.assert_close(b.sums, a.sums, **EXACT)
    torch.testing.assert_close(b.counts, a.counts, **EXACT)
    for name in sets:
        torch.testing.assert_close(b.scores[name], a.scores[name], **EXACT)
        for pos, t in a.per_prompt[name].items():
            torch.testing.assert_close(b.per_prompt[name][pos], t, **EXACT)
    # a subset of layers stops the forward early on both
    c, d = (capture(m, tk, sets, layers=[1, 3], batch_size=4, progress=False) for m in (whole, placed))
    torch.testing.assert_close(d.sums, c.sums, **EXACT)


@pytest.mark.parametrize("mode", ["all", "prompt", "instruction", "mask"])
def test_ablate_and_add_match_in_every_position_mode(pair, mode):
    whole, placed, tk, _ = pair
    fb = format_prompts(tk, PROMPTS)
    kw = {"positions": mode} if mode != "mask" else {"positions": torch.rand(fb.input_ids.shape,
                                                                               generator=torch.Generator().manual_seed(4)) < 0.5}
    if mode == "instruction":
        kw["tokenizer"] = tk
    r, v = _vector(1), _vector(2)
    base = _logits(whole, fb)
    for ctx in (lambda m: ablate(m, r, **kw), lambda m: ablate(m, torch.stack([r, v], 1), beta=0.7, layers=[1, 3], **kw),
                lambda m: add(m, 3 * v, 1, alpha=-1.5, **kw), lambda m: add(m, 3 * v, 3, **kw)):
        with ctx(whole):
            ref = _logits(whole, fb)
        with ctx(placed):
            got = _logits(placed, fb)
        assert (ref - base).abs().max() > 1e-4  # the edit does something
        torch.testing.assert_close(got, ref, **EXACT)
    torch.testing.assert_close(_logits(placed, fb), base, **EXACT)  # no hook left behind


def test_greedy_generation_matches_with_and_without_hooks(pair):
    whole, placed, tk, _ = pair
    a, b = _gen(whole, tk), _gen(placed, tk)
    assert b.token_ids == a.token_ids and b.texts == a.texts
    r, v = _vector(6), _vector(7)
    with ablate(whole, r, positions="prompt"):
        a = _gen(whole, tk)
    with ablate(placed, r, positions="prompt"):
        b = _gen(placed, tk)
    assert b.token_ids == a.token_ids
    with add(whole, 4 * v, 2):
        a = _gen(whole, tk)
    with add(placed, 4 * v, 2):
        b = _gen(placed, tk)
    assert b.token_ids == a.token_ids


def test_generation_drops_finished_rows_from_a_cache_over_several_devices(pair):
    """A stop string that ends some rows but not others makes generate drop those rows from the KV cache."""
    whole, placed, tk, _ = pair
    plain = _gen(whole, tk)
    for stop in dict.fromkeys(w for t in plain.texts for w in t.split()):
        ref = _gen(whole, tk, stop_strings=[stop])
        if ref.compactions:
            break
    else:
        pytest.fail(f"no word of the answers ends some rows and not others: {plain.texts}")
    got = _gen(placed, tk, stop_strings=[stop])
    assert (got.token_ids, got.stop_reasons, got.compactions) == (ref.token_ids, ref.stop_reasons, ref.compactions)


# --- weight orthogonalisation ---------------------------------------------------------------------------

def test_orthogonalize_edits_offloaded_weights_and_restores_them(pair):
    whole, placed, tk, off = pair
    fb = format_prompts(tk, PROMPTS)
    base = _logits(whole, fb)
    ad = ModelAdapter(placed)
    hooked = [m for m in placed.modules() if getattr(getattr(m, "_hf_hook", None), "offload", False)]
    maps = {id(m): m._hf_hook.weights_map for m in hooked}
    files = _files_digest(off)
    r = _vector(8, (D, 2))
    with orthogonalize(whole, r):
        ref = _logits(whole, fb)
    with orthogonalize(placed, r):
        got = _logits(placed, fb)
        assert ad.layers[1].mlp.down_proj.weight.device.type == "meta"  # still offloaded, edited in its weights map
    assert (ref - base).abs().max() > 1e-4
    torch.testing.assert_close(got, ref, **EXACT)
    assert all(m._hf_hook.weights_map is maps[id(m)] for m in hooked)  # accelerate's own maps are back
    assert _files_digest(off) == files  # the offload store was never written
    torch.testing.assert_close(_logits(placed, fb), base, **EXACT)
    # and the offloaded weights under the hooks of ablate give the same logits up to float32 rounding
    with ablate(placed, r):
        hooks = _logits(placed, fb)
    torch.testing.assert_close(hooks, got, rtol=1e-4, atol=1e-4)


def test_export_from_a_placed_model_loads_plainly(pair, tmp_path):
    whole, placed, tk, _ = pair
    r = _vector(9)
    out = export_orthogonalized(placed, tk, r, tmp_path / "orth")
    plain, _ = load_model(out, device="cpu")
    fb = format_prompts(tk, PROMPTS)
    with orthogonalize(whole, r):
        ref = _logits(whole, fb)
    torch.testing.assert_close(_logits(plain, fb), ref, **EXACT)


def test_orthogonalize_a_tied_gpt2_with_its_embeddings_on_disk(tok, tmp_path):
    """GPT-2: the head is tied to the token embedding, and position embeddings and biases write to the residual."""
    m = tiny_model("gpt2", tokenizer=tok, n_layers=2, d_model=D, seed=13)
    folder = _save(m, tok, tmp_path / "gpt2")
    whole, tk = load_model(folder, device="cpu")
    assert whole.lm_head.weight is whole.transformer.wte.weight
    dm = {"transformer.wte": "disk", "transformer.wpe": "disk", "transformer.h.0": "cpu", "transformer.h.1": "disk",
          "transformer.ln_f": "cpu", "lm_head": "disk"}
    placed, _ = load_model(folder, device_map=dm, offload_folder=tmp_path / "off")
    fb = format_prompts(tk, PROMPTS)
    base = _logits(whole, fb)
    torch.testing.assert_close(_logits(placed, fb), base, **EXACT)
    r = _vector(10)
    with orthogonalize(whole, r):
        ref = _logits(whole, fb)
    with orthogonalize(placed, r):
        got = _logits(placed, fb)
    assert (ref - base).abs().max() > 1e-4
    torch.testing.assert_close(got, ref, **EXACT)  # the head kept the unedited rows
    torch.testing.assert_close(_logits(placed, fb), base, **EXACT)


# --- selection ------------------------------------------------------------------------------------------

def test_carrier_selection_scores_match(pair):
    from pysafegeom.protocol.carriers import fit_carriers
    from pysafegeom.protocol.selection import select_carrier

    whole, placed, tk, _ = pair
    cap = capture(whole, tk, {"harmful": HARMFUL, "harmless": HARMLESS}, progress=False)
    car = fit_carriers(cap)
    enc_h, enc_l = encode_prompts(tk, HARMFUL), encode_prompts(tk, HARMLESS)
    kw = dict(positions=["eoi-2", "eoi-1"], n_kl_controls=2, batch_size=2, progress=False)
    a = select_carrier(whole, tk, car, enc_h, enc_l, [57], **kw)
    b = select_carrier(placed, tk, car, enc_h, enc_l, [57], **kw)
    assert (b.outcome, b.layer, b.position) == (a.outcome, a.layer, a.position)
    assert len(a.candidates) == len(b.candidates) > 0
    for x, y in zip(a.candidates, b.candidates):
        for k in ("bypass", "induce", "kl"):
            u, w = getattr(x, k), getattr(y, k)
            assert (u != u and w != w) or u == w, (x.layer, x.position, k, u, w)


# --- bad input ------------------------------------------------------------------------------------------

def test_bad_device_maps_are_clear_errors(folder, tmp_path):
    cases = [
        (dict(device="cpu", device_map="auto"), InvalidArgument, ("device=", "device_map=", "exclude")),
        (dict(device_map="autoo"), InvalidArgument, ("device_map", "'autoo'", "did you mean 'auto'")),
        (dict(device_map=["cpu"]), InvalidType, ("device_map", "list")),
        (dict(device_map={}), InvalidArgument, ("device_map", "empty")),
        (dict(max_memory={"cpu": "1GiB"}), InvalidArgument, ("max_memory=", "device_map=")),
        (dict(offload_folder=tmp_path), InvalidArgument, ("offload_folder=", "device_map=")),
        (dict(device_map=DISK_MAP), InvalidArgument, ("'disk'", "offload_folder=", "model.embed_tokens")),
        (dict(device_map={**DISK_MAP, "model.layers.1": "gpu"}), InvalidArgument, ("model.layers.1", "'cuda'")),
        (dict(device_map={**DISK_MAP, "lm_head": "meta"}), InvalidArgument, ("lm_head", "meta", "'disk'")),
        (dict(device_map={**DISK_MAP, "model.layers.1": 1.5}), InvalidType, ("model.layers.1", "float")),
        (dict(device_map={"": "cpu", 3: "cpu"}), InvalidType, ("device_map keys", "int")),
        (dict(device_map={**DISK_MAP, "model.layer.2": "cpu"}, offload_folder=tmp_path / "o"), InvalidArgument,
         ("model.layer.2", "not a module", "did you mean 'model.layers.2'")),
        (dict(device_map={k: v for k, v in DISK_MAP.items() if k != "model.layers.3"}, offload_folder=tmp_path / "o"),
         InvalidArgument, ("no device", "model.layers.3")),
        (dict(device_map={"": "cpu"}, max_memory={"cpu": "1GiB"}), InvalidArgument, ("max_memory=", "dict")),
        (dict(device_map="auto", max_memory={"cpu": "lots"}), InvalidArgument, ("max_memory['cpu']", "'lots'", "GiB")),
        (dict(device_map="auto", max_memory={"cpu": -5}), InvalidArgument, ("max_memory['cpu']", "> 0")),
        (dict(device_map="auto", max_memory=["1GiB"]), InvalidType, ("max_memory", "dict")),
    ]
    (tmp_path / "a_file").write_text("x")
    cases.append((dict(device_map=DISK_MAP, offload_folder=tmp_path / "a_file"), InvalidArgument,
                  ("offload_folder", "not a folder")))
    for kw, exc, names in cases:
        assert_clear(lambda: load_model(folder, **kw), exc, *names)
    assert not (tmp_path / "o").exists()  # the map was checked before any weight was written


def test_placement_modes_within_max_memory(tmp_path):
    """'auto', 'balanced' and 'sequential' within a host budget (a small vocabulary, so the blocks dominate)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(300)} | {"<unk>": 300, "<s>": 301, "</s>": 302}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    folder = _save(tiny_model("llama", n_layers=4, d_model=64, vocab_size=303, seed=14), tok, tmp_path / "m")
    whole, _ = load_model(folder, device="cpu")
    ids = torch.randint(0, 303, (3, 9), generator=torch.Generator().manual_seed(15))
    ref = whole(input_ids=ids).logits
    for dm in ("auto", {"": "cpu"}):  # room for everything: one device, nothing offloaded
        m, _ = load_model(folder, device_map=dm)
        assert not is_offloaded(m) and input_device(m) == torch.device("cpu")
        torch.testing.assert_close(m(input_ids=ids).logits, ref, **EXACT)
    r = _vector(16, (64,))
    for mode in ("auto", "balanced", "sequential"):  # a host budget smaller than the model: the rest on the disk
        m, _ = load_model(folder, device_map=mode, max_memory={"cpu": "400KB"}, offload_folder=tmp_path / mode)
        assert set(m.hf_device_map.values()) == {"cpu", "disk"} and is_sharded(m), m.hf_device_map
        torch.testing.assert_close(m(input_ids=ids).logits, ref, **EXACT)
        with orthogonalize(m, r), orthogonalize(whole, r):
            torch.testing.assert_close(m(input_ids=ids).logits, whole(input_ids=ids).logits, **EXACT)


# --- blocks on the CPU and on a GPU (runs where CUDA is available) ---------------------------------------

def _split_between(model, gpu):
    """``model`` (on the CPU) with its embedding, blocks 1 and 3 and head on ``gpu`` and the rest computing on the
    CPU: accelerate's main device is the CPU, so nothing is offloaded and every block runs where it is placed."""
    from accelerate import dispatch_model

    dm = {"model.embed_tokens": gpu, "model.layers.0": "cpu", "model.layers.1": gpu, "model.layers.2": "cpu",
          "model.layers.3": gpu, "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": gpu}
    dispatch_model(model, device_map=dm, main_device="cpu")
    model.hf_device_map = dm
    return model


def _within_rounding(whole, placed, tk, routes, ref64=None):
    """Under each route (a function model -> context), ``placed``'s logits differ from the float64 model's by no
    more than a small multiple of what ``whole`` in float32 on the CPU differs by (STYLE.md's rule)."""
    import copy

    ref64 = ref64 if ref64 is not None else copy.deepcopy(whole).double()
    fb = format_prompts(tk, PROMPTS)
    dev = input_device(placed)
    for ctx in routes:
        with torch.no_grad(), ctx(ref64):
            ref = _logits(ref64, fb)
        with torch.no_grad(), ctx(whole):
            err32 = (_logits(whole, fb).double() - ref).abs().max()
        with torch.no_grad(), ctx(placed):
            got = placed(input_ids=fb.input_ids.to(dev), attention_mask=fb.attention_mask.to(dev)).logits
        assert got.device == dev  # logits come back where the inputs went
        assert (got.cpu().double() - ref).abs().max() <= 8 * err32 + 1e-7
    return ref64


def _check_split(whole, split, tk, gpu):
    """Every route on ``split`` within a small multiple of float32 rounding (whole's error against float64)."""
    from contextlib import nullcontext

    assert input_device(split) == torch.device(gpu) and ModelAdapter(split).device_of(split.model.layers[0]).type == "cpu"
    fb = format_prompts(tk, PROMPTS)
    mask = torch.rand(fb.input_ids.shape, generator=torch.Generator().manual_seed(4)) < 0.5
    r, v = _vector(1), _vector(2)
    routes = [lambda m: nullcontext(), lambda m: ablate(m, r), lambda m: ablate(m, r, positions=mask),
              lambda m: ablate(m, r, positions="instruction", tokenizer=tk), lambda m: add(m, 3 * v, 1),
              lambda m: add(m, 3 * v, 2, positions="prompt"), lambda m: orthogonalize(m, torch.stack([r, v], 1))]
    ref64 = _within_rounding(whole, split, tk, routes)
    with torch.no_grad():
        hs32 = whole(input_ids=fb.input_ids, attention_mask=fb.attention_mask, output_hidden_states=True).hidden_states
        hs64 = ref64(input_ids=fb.input_ids, attention_mask=fb.attention_mask, output_hidden_states=True).hidden_states
    err_h = max(float((a.double() - b).abs().max()) for a, b in zip(hs32, hs64))
    sets = {"harmful": HARMFUL, "harmless": HARMLESS}
    kw = dict(refusal_tokens=[57, 330], batch_size=2, progress=False)
    a, b = capture(whole, tk, sets, **kw), capture(split, tk, sets, **kw)
    n = float(b.counts.max())
    assert float((b.sums - a.sums).abs().max()) <= 16 * n * err_h + 1e-6
    for name in sets:
        for pos, t in a.per_prompt[name].items():
            assert float((b.per_prompt[name][pos] - t).abs().max()) <= 16 * err_h + 1e-6
    g_whole, g_split = _gen(whole, tk), _gen(split, tk)
    assert g_split.token_ids == g_whole.token_ids


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_blocks_split_between_the_cpu_and_a_gpu(pair):
    import copy

    whole, _, tk, _ = pair
    _check_split(whole, _split_between(copy.deepcopy(whole), "cuda:0"), tk, "cuda:0")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_offload_under_a_gpu_main_device(folder, pair):
    """With a GPU in the map, 'cpu' blocks are offloaded (host state dict, loaded onto the GPU per forward)."""
    whole, _, tk, _ = pair
    dm = {**{k: "cpu" for k in DISK_MAP}, "model.embed_tokens": 0, "model.layers.2": 0, "lm_head": 0}
    placed, _ = load_model(folder, device_map=dm, dtype=torch.float32)
    assert is_offloaded(placed) and input_device(placed) == torch.device("cuda:0")
    r = _vector(3)
    _within_rounding(whole, placed, tk, [lambda m: ablate(m, r), lambda m: orthogonalize(m, r),
                                         lambda m: ablate(m, r, positions="instruction", tokenizer=tk)])
    assert _gen(placed, tk).token_ids == _gen(whole, tk).token_ids
