"""Worker run inside the nanoGCG virtual environment (see bench/nanogcg_peer.py).

    python _nanogcg_worker.py run|score SPEC.json OUT.json

It imports nanogcg 0.3.0, transformers 4.47.1 and torch, never pysafegeom. The spec is a JSON object
(fields in nanogcg_peer.py); the result, a JSON object, is written to OUT.json (stdout and stderr are
left to nanoGCG's logging and tqdm). A failure inside nanoGCG is caught and reported in the result's
``error`` field with whatever had been measured up to then.
"""

from __future__ import annotations

import json
import resource
import sys
import time
import traceback
from pathlib import Path

DEFAULTS = {
    "messages": None,
    "target": None,
    "num_steps": 2,
    "search_width": 512,
    "topk": 256,
    "n_replace": 1,
    "optim_str_init": "x x x x x x x x x x x x x x x x x x x x",
    "seed": 0,
    "use_prefix_cache": True,
    "threads": 2,
    "chat_template": None,
    "buffer_size": 0,
    "filter_ids": True,
    "early_stop": False,
    "batch_size": None,
    "allow_non_ascii": False,
    "add_space_before_target": False,
    "use_mellowmax": False,
    "mellowmax_alpha": 1.0,
    "attn_implementation": None,
    "verbosity": "WARNING",
}


def _mb_peak() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _mb_now() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _token_str(value):
    if isinstance(value, dict):  # a serialised AddedToken
        return value.get("content")
    return value


def load_tokenizer(model_path: Path, chat_template: str | None):
    """The tokenizer as transformers 4.47.1 can build it, and a note on how it was built.

    Directories written by transformers 5 name ``TokenizersBackend`` as tokenizer class, which 4.47.1
    does not know; then the fast tokenizer is built straight from tokenizer.json, with the special
    tokens of tokenizer_config.json and the chat template of tokenizer_config.json or
    chat_template.jinja (where transformers 5 keeps it).
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        tok = AutoTokenizer.from_pretrained(str(model_path))
        how = f"AutoTokenizer ({type(tok).__name__})"
    except (ValueError, KeyError, OSError) as exc:
        cfg_file = model_path / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        special = {
            k: _token_str(cfg[k])
            for k in ("bos_token", "eos_token", "unk_token", "pad_token")
            if _token_str(cfg.get(k)) is not None
        }
        tok = PreTrainedTokenizerFast(tokenizer_file=str(model_path / "tokenizer.json"), **special)
        how = f"PreTrainedTokenizerFast from tokenizer.json (AutoTokenizer failed: {exc})"
    if not tok.chat_template:
        cfg_file = model_path / "tokenizer_config.json"
        tmpl = json.loads(cfg_file.read_text()).get("chat_template") if cfg_file.is_file() else None
        jinja = model_path / "chat_template.jinja"
        if not tmpl and jinja.is_file():
            tmpl = jinja.read_text()
        if tmpl:
            tok.chat_template = tmpl
            how += "; chat template from " + ("tokenizer_config.json" if not jinja.is_file() else "chat_template.jinja")
    if chat_template is not None:
        tok.chat_template = chat_template
        how += "; chat template overridden by the spec"
    return tok, how


def load_model(model_path: Path, attn_implementation: str | None):
    """The model in fp32 on the CPU, with the config fixed up for transformers 4.47.1.

    transformers 5 writes ``rope_parameters`` (``{"rope_theta": ..., "rope_type": ...}``) where 4.47.1
    reads ``rope_theta`` / ``rope_scaling``; left alone, 4.47.1 would silently use its default
    rope_theta (10000 for Llama, SmolLM2 needs 100000).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_path))
    notes = []
    rp = getattr(config, "rope_parameters", None)
    if isinstance(rp, dict):
        if "rope_theta" in rp and getattr(config, "rope_theta", None) != rp["rope_theta"]:
            notes.append(f"rope_theta {getattr(config, 'rope_theta', None)} -> {rp['rope_theta']} (from rope_parameters)")
            config.rope_theta = rp["rope_theta"]
        if rp.get("rope_type", "default") != "default":
            scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
            config.rope_scaling = scaling
            notes.append(f"rope_scaling = {scaling} (from rope_parameters)")
    kwargs = {"config": config, "torch_dtype": torch.float32}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(str(model_path), **kwargs)
    model.eval()
    model.requires_grad_(False)
    return model, notes


def _versions():
    import nanogcg
    import torch
    import transformers

    try:
        from importlib.metadata import version

        ng = version("nanogcg")
    except Exception:  # pragma: no cover
        ng = getattr(nanogcg, "__version__", "?")
    return {"nanogcg": ng, "transformers": transformers.__version__, "torch": torch.__version__}


def _gcg_config(spec):
    from nanogcg import GCGConfig

    return GCGConfig(
        num_steps=int(spec["num_steps"]),
        optim_str_init=spec["optim_str_init"],
        search_width=int(spec["search_width"]),
        batch_size=spec["batch_size"],
        topk=int(spec["topk"]),
        n_replace=int(spec["n_replace"]),
        buffer_size=int(spec["buffer_size"]),
        use_mellowmax=bool(spec["use_mellowmax"]),
        mellowmax_alpha=float(spec["mellowmax_alpha"]),
        early_stop=bool(spec["early_stop"]),
        use_prefix_cache=bool(spec["use_prefix_cache"]),
        allow_non_ascii=bool(spec["allow_non_ascii"]),
        filter_ids=bool(spec["filter_ids"]),
        add_space_before_target=bool(spec["add_space_before_target"]),
        seed=spec["seed"],
        verbosity=spec["verbosity"],
    )


def _template(tok, messages, target, add_space):
    """nanoGCG 0.3.0's own prompt construction (gcg.py, GCG.run lines 241-256), repeated to report it."""
    import copy

    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    else:
        messages = copy.deepcopy(messages)
    if not any(["{optim_str}" in d["content"] for d in messages]):
        messages[-1]["content"] = messages[-1]["content"] + "{optim_str}"
    raw = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    template = raw
    if tok.bos_token and template.startswith(tok.bos_token):
        template = template.replace(tok.bos_token, "")
    return raw, template, (" " + target if add_space else target)


class _RecordingEmbedding:
    """Stands in for nanoGCG's ``self.embedding_layer``: records the first calls' ids (before/after/target)."""

    def __init__(self, layer, keep: int = 3):
        self._layer = layer
        self._keep = keep
        self.seen = []

    def __call__(self, ids):
        if len(self.seen) < self._keep:
            self.seen.append(ids.detach().cpu().tolist())
        return self._layer(ids)

    def __getattr__(self, name):
        return getattr(self._layer, name)


def mode_run(spec, out):
    import nanogcg.gcg as G

    t0 = time.perf_counter()
    tok, tok_how = load_tokenizer(Path(spec["model_path"]), spec["chat_template"])
    model, notes = load_model(Path(spec["model_path"]), spec["attn_implementation"])
    out["load_seconds"] = time.perf_counter() - t0
    out["rss_after_load_mb"] = _mb_now()
    out["peak_rss_after_load_mb"] = _mb_peak()
    out["tokenizer"] = tok_how
    out["load_notes"] = notes
    out["attn_implementation"] = getattr(model.config, "_attn_implementation", None)

    raw, template, target = _template(tok, spec["messages"], spec["target"], spec["add_space_before_target"])
    out["template_raw"] = raw
    out["template_text"] = template
    out["bos_token"] = tok.bos_token

    config = _gcg_config(spec)
    out["config"] = {k: v for k, v in vars(config).items() if k != "probe_sampling_config"}

    # --- instrumentation -------------------------------------------------------------------------
    stamps = []  # perf_counter at the start of each loop iteration (+ one when the loop ends)

    loop_done = []

    def timed_tqdm(iterable, *a, **k):
        for x in iterable:
            stamps.append(time.perf_counter())
            yield x
        stamps.append(time.perf_counter())
        loop_done.append(True)

    grad_t, filter_t, cand_t, n_cands, step_ids = [], [], [], [], []

    def in_loop():
        return len(stamps) > 0

    orig_filter = G.filter_ids

    def timed_filter(ids, tokenizer):
        t = time.perf_counter()
        r = orig_filter(ids, tokenizer)
        filter_t.append(time.perf_counter() - t)
        return r

    orig_get_best = G.AttackBuffer.get_best_ids

    def rec_get_best(self):
        r = orig_get_best(self)
        step_ids.append(r[0].detach().cpu().tolist())
        return r

    G.tqdm = timed_tqdm
    G.filter_ids = timed_filter
    G.AttackBuffer.get_best_ids = rec_get_best
    import logging

    G.logger.setLevel(getattr(logging, spec["verbosity"]))  # as nanogcg.run() does

    t1 = time.perf_counter()
    gcg = G.GCG(model, tok, config)
    out["gcg_init_seconds"] = time.perf_counter() - t1
    rec_emb = _RecordingEmbedding(gcg.embedding_layer)
    gcg.embedding_layer = rec_emb

    orig_grad = gcg.compute_token_gradient

    def timed_grad(optim_ids):
        t = time.perf_counter()
        r = orig_grad(optim_ids)
        grad_t.append(time.perf_counter() - t)
        return r

    gcg.compute_token_gradient = timed_grad

    orig_cand = gcg._compute_candidates_loss_original

    def timed_cand(search_batch_size, input_embeds):
        t = time.perf_counter()
        r = orig_cand(search_batch_size, input_embeds)
        dt = time.perf_counter() - t
        if in_loop():
            k = len(stamps) - 1
            while len(cand_t) <= k:
                cand_t.append(0.0)
                n_cands.append(0)
            cand_t[k] += dt
            n_cands[k] += int(input_embeds.shape[0])
        else:
            out["init_buffer_loss_seconds"] = dt
        return r

    # the method is looked up on the instance inside run(), so an instance attribute takes effect;
    # find_executable_batch_size inspects the signature, which must keep (search_batch_size, input_embeds)
    gcg._compute_candidates_loss_original = timed_cand

    orig_init_buffer = gcg.init_buffer

    def rec_init_buffer():
        b = orig_init_buffer()
        try:
            out["init_loss"] = float(b.get_lowest_loss())
        except Exception:  # pragma: no cover
            pass
        return b

    gcg.init_buffer = rec_init_buffer

    result = None
    t_run = time.perf_counter()
    try:
        result = gcg.run(spec["messages"], spec["target"])
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc()
    t_end = time.perf_counter()
    out["run_seconds"] = t_end - t_run
    out["setup_seconds"] = (stamps[0] - t_run) if stamps else None

    # one entry per loop iteration: from its start to the next one's (or to the loop's end); a loop
    # left by break (early stop) ends when run() returns; an iteration cut short by an error is dropped
    bounds = list(stamps) if loop_done or not stamps else list(stamps) + [t_end]
    per_step = [bounds[i + 1] - bounds[i] for i in range(len(bounds) - 1)]
    if "error" in out and per_step:
        per_step = per_step[:-1]
    out["seconds_per_step"] = per_step
    out["grad_seconds"] = grad_t
    out["filter_seconds"] = filter_t
    out["candidates_loss_seconds"] = cand_t
    out["n_candidates"] = n_cands

    if len(rec_emb.seen) >= 3:
        out["before_ids"], out["after_ids"], out["target_ids"] = (s[0] for s in rec_emb.seen[:3])
        # check that the reported template is the one nanoGCG tokenised
        before_str, after_str = template.split("{optim_str}")
        chk = tok([before_str], padding=False)["input_ids"][0]
        out["template_matches_ids"] = chk == out["before_ids"]
    out["init_ids"] = step_ids[0] if step_ids else None
    out["step_ids"] = step_ids[1:]  # the buffer's best suffix ids after each step

    if result is not None:
        out["losses"] = [float(x) for x in result.losses]
        out["best_loss"] = float(result.best_loss)
        out["best_string"] = result.best_string
        out["strings"] = list(result.strings)
        if out["step_ids"]:
            out["best_ids"] = out["step_ids"][result.losses.index(min(result.losses))]
    out["peak_rss_mb"] = _mb_peak()


def mode_score(spec, out):
    import torch
    import nanogcg.gcg as G
    from nanogcg.utils import find_executable_batch_size

    t0 = time.perf_counter()
    tok, tok_how = load_tokenizer(Path(spec["model_path"]), spec["chat_template"])
    model, notes = load_model(Path(spec["model_path"]), spec["attn_implementation"])
    out["load_seconds"] = time.perf_counter() - t0
    out["tokenizer"] = tok_how
    out["load_notes"] = notes

    config = _gcg_config(spec)
    config.early_stop = False
    if spec["seed"] is not None:
        from transformers import set_seed

        set_seed(spec["seed"])
        torch.use_deterministic_algorithms(True, warn_only=True)
    gcg = G.GCG(model, tok, config)

    def as_row(x):
        t = torch.as_tensor(x, dtype=torch.int64)
        return t.reshape(1, -1)

    before_ids = as_row(spec["before_ids"])
    after_ids = as_row(spec["after_ids"])
    target_ids = as_row(spec["target_ids"])
    cands = spec["candidates"]
    if not cands or len({len(c) for c in cands}) != 1:
        raise ValueError("candidates must be a non-empty list of equally long token-id rows")
    sampled_ids = torch.as_tensor(cands, dtype=torch.int64)

    # as in GCG.run (gcg.py lines 264-276) with the given ids in place of nanoGCG's own tokenisation
    embedding_layer = gcg.embedding_layer
    before_embeds, after_embeds, target_embeds = [embedding_layer(ids) for ids in (before_ids, after_ids, target_ids)]
    if config.use_prefix_cache:
        with torch.no_grad():
            output = model(inputs_embeds=before_embeds, use_cache=True)
            gcg.prefix_cache = output.past_key_values
    gcg.target_ids = target_ids
    gcg.before_embeds = before_embeds
    gcg.after_embeds = after_embeds
    gcg.target_embeds = target_embeds

    t1 = time.perf_counter()
    with torch.no_grad():
        # as in GCG.run's loop (gcg.py lines 331-350)
        new_search_width = sampled_ids.shape[0]
        batch_size = new_search_width if config.batch_size is None else config.batch_size
        if gcg.prefix_cache:
            input_embeds = torch.cat([
                embedding_layer(sampled_ids),
                after_embeds.repeat(new_search_width, 1, 1),
                target_embeds.repeat(new_search_width, 1, 1),
            ], dim=1)
        else:
            input_embeds = torch.cat([
                before_embeds.repeat(new_search_width, 1, 1),
                embedding_layer(sampled_ids),
                after_embeds.repeat(new_search_width, 1, 1),
                target_embeds.repeat(new_search_width, 1, 1),
            ], dim=1)
        loss = find_executable_batch_size(gcg._compute_candidates_loss_original, batch_size)(input_embeds)
    out["score_seconds"] = time.perf_counter() - t1
    out["losses"] = [float(x) for x in loss.tolist()]
    out["prefix_cache_type"] = type(gcg.prefix_cache).__name__ if gcg.prefix_cache is not None else None
    out["peak_rss_mb"] = _mb_peak()


def main(argv):
    if len(argv) != 4 or argv[1] not in ("run", "score"):
        print(__doc__, file=sys.stderr)
        return 2
    mode, spec_path, out_path = argv[1], Path(argv[2]), Path(argv[3])
    spec = dict(DEFAULTS)
    spec.update(json.loads(spec_path.read_text()))
    out = {"mode": mode}
    try:
        import torch

        torch.set_num_threads(int(spec["threads"]))
        out["threads"] = torch.get_num_threads()
        out["versions"] = _versions()
        if not Path(str(spec.get("model_path"))).is_dir():
            raise FileNotFoundError(f"model_path {spec.get('model_path')!r} is not a directory (a local HF-format model)")
        if mode == "run":
            if spec["messages"] is None or spec["target"] is None:
                raise ValueError("spec needs 'messages' and 'target'")
            mode_run(spec, out)
        else:
            mode_score(spec, out)
    except Exception as exc:
        out.setdefault("error", f"{type(exc).__name__}: {exc}")
        out.setdefault("traceback", traceback.format_exc())
    out.setdefault("peak_rss_mb", _mb_peak())
    out_path.write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
