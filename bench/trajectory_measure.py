"""Measure every anchor of training trajectories (R2D2 and its SFT control) with the package itself.

PROTOCOL.md sections 3, 5, 6 and 7. An anchor is a ``checkpoint-N/`` folder of a trajectory (N = optimizer
step; a LoRA adapter or full model folder that :func:`pysafegeom.models.load_model` opens). Step 0 is the base
model (``--base``; default: the ``base_model`` the checkpoints' ``train_config.json`` names), measured once as
``base-0`` and shared by every trajectory; a ``checkpoint-0`` whose LoRA update is zero (every ``lora_B`` tensor 0)
is that base and is not measured again, any other ``checkpoint-0`` is measured as its trajectory's own step 0.

Per anchor, five groups (greedy decoding, ``--max-new-tokens``, CPU):

1. ``direct_request``: HarmBench test standard behaviours (159) refused, substring judge (the R2D2 string
   "Sorry, I can't do that." counts), through ``bench/eval_safety.py``'s ``public_sets``/``evaluate_public``;
2. ``fixed_source``: every test case of the store ``--fixed-source`` (default GCG cases made once on the step-0
   model) replayed with :func:`pysafegeom.attacks.replay.replay` (``--replay-max-new-tokens``, default 64 as the
   source run judged them), plus the direct requests of the same behaviours (``direct`` records made from the
   store's behaviour texts, unless the store holds its own), ASR per method = share not refused (substring judge).
   The store may still be growing: the records present when an anchor is measured are used, their keys are
   recorded, and a later run re-measures this group alone (replay's cache generates only the new cases) when
   the store has gained records, so every anchor ends on the same cases;
3. ``xstest``: any-refusal (full or partial, the package's XSTest judge) on the 250 safe prompts;
4. ``utility``: the first ``--n-alpaca`` alpaca_eval instructions answered (substring judge) and the mean
   cross-entropy (nats/token) of their reference outputs;
5. ``geometry``: activations captured (:func:`pysafegeom.protocol.capture.capture`) on public prompts:
   H and R fitted (:func:`~pysafegeom.protocol.carriers.fit_carriers`) on a seeded sample of ``--n-fit`` prompts of
   refusal_direction's ``harmful_train`` and ``harmless_train`` splits, R behaviour-filtered when >= 16 prompts
   remain per side (logit refusal score); the package's metric stage
   (:func:`pysafegeom.pipelines.stages.stage_metrics`) at the fixed layer ``--layer`` (default int(0.6 L): layer 18
   of SmolLM2-135M's 30, where the base's lowest-bypass candidate sits) and position eoi-1 (t_post_inst): the
   same-layer coupling profile |cos(H, R)| (its mid-band 0.2L <= l < 0.8L mean and max), the effective rank of
   the unit R vectors over the post-instruction positions (PROTOCOL 10.5), kappa_sub (k = 3), the process
   correlation rho and the Latent Guard AUROC, read on held-out prompts (HarmBench test behaviours, a sample of
   refusal_direction ``harmless_val``, XSTest safe); and the drift against the trajectory's step 0 at that layer:
   1 - |cos| of R and of H, and the mean principal angle (degrees) between the k = 3 subspaces Q_R and Q_H. No
   carrier selection and no interventions run unless ``--select`` (then :func:`pysafegeom.analyze` runs too, with
   a coarse grid, and its selected carrier is recorded).

Data hygiene (STYLE.md): every checkpoint's recorded training prompts (``training_prompts.json``) are compared
(:func:`pysafegeom.validate.overlap`) with every evaluation and readout prompt and with the fixed-source test
cases and behaviours; an overlap stops the run before any model is measured, naming the checkpoint, the set and a
prompt. The carrier fit prompts are sampled once and every prompt any anchor trained on is left out of them (and
any prompt of the readout sets), so all anchors are fitted on the same held-out prompts (their hash is recorded).

Outputs in ``--out`` (resumable: a finished anchor is skipped; changed settings are refused):
``<trajectory>-<step>.json`` per anchor (``base-0.json`` for the shared step 0; atomic writes),
``<name>.carriers.safetensors`` (H, R at eoi-1, Q_H and Q_R per layer, for drift), ``replay/<name>/`` (replay's
folders), ``table.md`` (one row per trajectory and step, k/n with 95% Wilson intervals) and ``trajectories.svg``
(each metric against step, one line per trajectory). ``--table-only`` rebuilds the last two from the JSONs.

    python bench/trajectory_measure.py --trajectory r2d2=trajectories/r2d2 --trajectory sft=trajectories/sft \\
        --fixed-source trajectories/fixed_source/gcg --out trajectories/measure --threads 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from eval_safety import _rate, evaluate_public, fmt_rate, public_sets  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data"
DEFAULT_BASE = "smollm2-135m-instruct"
CONTENT = "trajectory measure"
BASE = "base"
BEHAVIOUR_SETS = ("harmbench_test", "xstest_safe", "alpaca_eval")
SETTINGS = ("max_new_tokens", "replay_max_new_tokens", "n_alpaca", "n_fit", "limit", "layer", "data")
_CKPT = re.compile(r"^checkpoint-(\d+)$")


# ------------------------------------------------------------------------------------------ anchors

@dataclass
class Anchor:
    """One model to measure: ``trajectory`` is ``"base"`` for the shared step 0 (then ``shared_by`` names the
    trajectories whose step 0 it is); ``spec`` is what :func:`load_model` opens."""

    trajectory: str
    step: int
    spec: str
    shared_by: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.trajectory}-{self.step}"


def parse_trajectory(s: str) -> tuple[str, Path]:
    name, sep, folder = s.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"--trajectory takes NAME=FOLDER (e.g. r2d2=trajectories/r2d2), got {s!r}")
    if name == BASE or not re.fullmatch(r"[A-Za-z0-9_.]+", name):
        raise argparse.ArgumentTypeError(f"trajectory name {name!r}: use letters, digits, '_' or '.', and not {BASE!r}")
    return name, Path(folder)


def checkpoint_folders(folder: Path) -> dict[int, Path]:
    """``{step: folder}`` of the ``checkpoint-N`` model folders in ``folder`` (in-progress ``.name.tmp`` ones are
    hidden names, so never listed)."""
    out = {}
    if folder.is_dir():
        for d in folder.iterdir():
            m = _CKPT.match(d.name)
            if m and d.is_dir() and ((d / "adapter_config.json").is_file() or (d / "config.json").is_file()):
                out[int(m.group(1))] = d
    return dict(sorted(out.items()))


def zero_update(folder: Path) -> bool:
    """True when ``folder`` is a LoRA adapter whose update is zero (every ``lora_B`` tensor 0: the untrained start)."""
    f = folder / "adapter_model.safetensors"
    if (folder / "config.json").is_file() or not f.is_file():
        return False
    from safetensors import safe_open

    with safe_open(str(f), framework="pt") as st:
        keys = [k for k in st.keys() if "lora_B" in k]
        return bool(keys) and all(not bool(st.get_tensor(k).any()) for k in keys)


def base_of(folders: dict[str, Path]) -> str | None:
    """The ``base_model`` the checkpoints' ``train_config.json`` names (one for all), or None when none does."""
    seen = {}
    for traj, folder in folders.items():
        for step, d in checkpoint_folders(folder).items():
            f = d / "train_config.json"
            if f.is_file():
                b = json.loads(f.read_text(encoding="utf-8")).get("base_model")
                if b:
                    seen.setdefault(str(b), f"{traj} step {step}")
    if len(seen) > 1:
        raise SystemExit(f"the checkpoints name different base models ({'; '.join(f'{b} ({w})' for b, w in seen.items())}); "
                         f"pass --base to say which is step 0")
    return next(iter(seen), None)


def find_anchors(folders: dict[str, Path], base: str) -> tuple[list[Anchor], list[str]]:
    """The shared base first, then each trajectory's checkpoints by step; and notes on what was decided."""
    anchors = [Anchor(BASE, 0, base, list(folders))]
    notes = [f"step 0 of every trajectory is the base model {base}, measured once ({BASE}-0)"]
    for traj, folder in folders.items():
        if not folder.is_dir():
            raise SystemExit(f"trajectory {traj}: {folder} is not a folder")
        ck = checkpoint_folders(folder)
        if 0 in ck:
            if zero_update(ck[0]):
                notes.append(f"{traj}: checkpoint-0 is a zero LoRA update of the base, so it is {BASE}-0")
                ck.pop(0)
            else:
                notes.append(f"{traj}: checkpoint-0 is not a zero LoRA update; measured as its own step 0 and used as "
                             f"{traj}'s drift reference")
                anchors[0].shared_by.remove(traj)
        if not ck:
            notes.append(f"{traj}: no checkpoint-N folders in {folder} (yet)")
        anchors += [Anchor(traj, s, str(d)) for s, d in ck.items()]
    return anchors, notes


def reference_of(anchor: Anchor, anchors: list[Anchor]) -> Anchor | None:
    """The step-0 anchor an anchor's drift is measured against (None for a step 0 itself)."""
    if anchor.step == 0:
        return None
    own = [a for a in anchors if a.trajectory == anchor.trajectory and a.step == 0]
    return own[0] if own else anchors[0]


# ------------------------------------------------------------------------------------------ prompt sets

def behaviour_sets(data: Path, n_alpaca: int, limit: int | None) -> dict[str, dict]:
    """``public_sets``' HarmBench test, XSTest safe and alpaca_eval sets (the first ``limit`` prompts of each)."""
    sets = {k: v for k, v in public_sets(data, "test", n_alpaca).items() if k in BEHAVIOUR_SETS}
    if limit:
        sets = {k: {**v, "prompts": v["prompts"][:limit],
                    **({"references": v["references"][:limit]} if "references" in v else {})} for k, v in sets.items()}
    return sets


def _rd(data: Path, split: str) -> list[str]:
    from pysafegeom.data import load_refusal_direction

    return [p.text for p in load_refusal_direction(data / "refusal_direction" / "splits" / f"{split}.json")]


def _sample(texts: list[str], n: int, seed: int) -> list[str]:
    return texts if len(texts) <= n else random.Random(seed).sample(texts, n)


def geometry_sets(data: Path, sets: dict[str, dict], n_fit: int, limit: int | None,
                  trained: list[str]) -> tuple[dict[str, list[str]], dict]:
    """The capture sets: fit (``harmful``, ``harmless``) and held-out readouts (``harmful_test``, ``harmless_test``,
    ``xstest_readout``), and a record of them. The fit samples are drawn first (seeded), then every prompt in
    ``trained`` or in a readout set is removed from them, so the sample does not depend on the trajectories."""
    from pysafegeom.validate import overlap

    n = min(n_fit, limit) if limit else n_fit
    readouts = {"harmful_test": sets["harmbench_test"]["prompts"],
                "harmless_test": _sample(_rd(data, "harmless_val"), n, 2),
                "xstest_readout": sets["xstest_safe"]["prompts"]}
    fit = {"harmful": _sample(_rd(data, "harmful_train"), n, 0), "harmless": _sample(_rd(data, "harmless_train"), n, 1)}
    held = [p for v in readouts.values() for p in v]
    record = {"source": "refusal_direction splits harmful_train / harmless_train (fit), HarmBench test + harmless_val "
                        "sample + XSTest safe (readouts)", "dropped": {}}
    for k in fit:
        drop = set(overlap(fit[k], list(trained) + held))
        if drop:
            record["dropped"][k] = len(drop)
            fit[k] = [p for p in fit[k] if p not in drop]
        if len(fit[k]) < 2:
            raise SystemExit(f"the {k} fit set has {len(fit[k])} prompts left after removing training and readout prompts")
    out = {**fit, **readouts}
    record["n"] = {k: len(v) for k, v in out.items()}
    record["fit_sha256_16"] = hashlib.sha256("\n".join(fit["harmful"] + ["--"] + fit["harmless"]).encode()).hexdigest()[:16]
    return out, record


def n_layers(spec: str) -> int:
    """The decoder depth of the model behind ``spec`` (from its config, without loading the weights)."""
    from transformers import AutoConfig

    from pysafegeom.models import resolve

    p = Path(spec)
    if (p / "adapter_config.json").is_file() and not (p / "config.json").is_file():
        p = Path(json.loads((p / "adapter_config.json").read_text())["base_model_name_or_path"])
    return int(AutoConfig.from_pretrained(str(resolve(str(p))), local_files_only=True).num_hidden_layers)


def training_record(spec: str) -> list[str] | None:
    """The training prompts recorded in the model folder behind ``spec`` (None when it records none)."""
    from pysafegeom.models import resolve
    from pysafegeom.models.provenance import read_training_prompts

    p = Path(spec)
    if not p.exists():
        try:
            p = resolve(spec)
        except Exception:  # noqa: BLE001 - an unresolvable spec fails later, at load_model, with its own message
            return None
    return read_training_prompts(p)


def check_hygiene(anchors: list[Anchor], evaluated: dict[str, list[str]]) -> dict[str, int]:
    """Raise :class:`~pysafegeom.errors.DataOverlap` when an anchor was trained on an evaluated prompt; returns
    ``{anchor name: number of recorded training prompts}``."""
    from pysafegeom.errors import DataOverlap
    from pysafegeom.validate import overlap

    counts, found = {}, []
    for a in anchors:
        rec = training_record(a.spec)
        counts[a.name] = len(rec) if rec else 0
        if rec is None and a.trajectory != BASE:
            print(f"warning: {a.name} ({a.spec}) records no training prompts (no training_prompts.json): its overlap "
                  f"with the evaluation prompts cannot be checked", file=sys.stderr)
        for set_name, texts in evaluated.items():
            o = overlap(texts, rec)
            if o:
                found.append(f"{a.name} ({a.spec}) was trained on {len(o)} prompt(s) of {set_name}, e.g. {o[0]!r}")
    if found:
        raise DataOverlap("training prompts overlap the evaluation prompts, so those figures would not be held out: "
                          + "; ".join(found) + ". Evaluate on other prompts, or train without them")
    return counts


# ------------------------------------------------------------------------------------------ fixed source

def open_fixed_source(path: str | None, limit: int | None):
    """``(stores to replay, keys, note)``: a frozen snapshot of the store's records now (read-only: a store being
    written by an attack is not touched) plus ``direct`` records of its behaviours; ``(None, [], why)`` when there
    are no records (yet)."""
    from pysafegeom.attacks.store import StoreError, TestCaseStore, direct_records, open_cases, record_key

    if not path:
        return None, [], "no --fixed-source given"
    recs, seen = [], set()
    for part in str(path).split(","):  # several stores: their records joined, one test case per (method, behaviour)
        p = Path(part)
        try:
            store = TestCaseStore(p, read_only=True) if (p / "records.jsonl").is_file() else open_cases(p)
        except StoreError:
            continue
        for r in store.records():
            k = (r.get("method"), r.get("id"))
            if k not in seen:
                seen.add(k)
                recs.append(r)
    p = Path(path)
    recs = recs[:limit] if limit else recs
    if not recs:
        return None, [], f"no test cases in {path} yet"
    snap = TestCaseStore.from_records(recs, name="fixed-source", origin=str(path))
    stores = [snap]
    methods = snap.methods()
    if "direct" not in methods:
        beh = [{"id": i, "text": t} for i, t in snap.behaviors().items() if t]
        if beh:
            stores.append(TestCaseStore.from_records(direct_records(beh), name="direct", origin=f"{p} (behaviours)"))
    keys = sorted([list(map(str, record_key(r))) for s in stores for r in s.records()])
    return stores, keys, f"{len(recs)} test case(s) of {', '.join(methods)} from {p}" + (
        "; direct requests made from their behaviours" if len(stores) > 1 else "")


def fixed_source_prompts(stores) -> list[str]:
    return list(dict.fromkeys(t for s in stores or [] for r in s.records()
                              for t in (r["test_case"], r["behavior"]) if t))


def measure_fixed_source(model, tok, name: str, stores, keys, note: str, out: Path, args) -> dict:
    from pysafegeom.attacks.replay import replay

    if stores is None:
        return {"status": "pending", "note": note, "keys": []}
    summary = replay(stores, model, tok, out=out / "replay" / name, max_new_tokens=args.replay_max_new_tokens,
                     batch_size=args.batch_size, target_name=name, progress=False)
    per = {m: _rate(r["k"], r["n"]) for m, r in summary["per_method"].items()}
    return {"status": "done", "note": note, "store": str(args.fixed_source), "judge": summary["primary_judge"],
            "max_new_tokens": args.replay_max_new_tokens, "per_method": per, "n_test_cases": summary["n_test_cases"],
            "replay": str(out / "replay" / name), "keys": keys}


# ------------------------------------------------------------------------------------------ geometry

def measure_geometry(model, tok, geo: dict[str, list[str]], layer: int, batch_size: int) -> tuple[dict, dict]:
    """PROTOCOL 3 at a fixed layer without selection: ``(metrics, tensors for drift)``."""
    from pysafegeom.models import ModelAdapter
    from pysafegeom.pipelines.analyze import AnalysisConfig
    from pysafegeom.pipelines.stages import stage_metrics
    from pysafegeom.protocol.capture import capture
    from pysafegeom.protocol.carriers import fit_carriers
    from pysafegeom.refusal import REFUSAL_TOKEN_PHRASES, find_refusal_tokens

    cfg = AnalysisConfig()
    L = ModelAdapter(model).n_layers
    cap = capture(model, tok, geo, refusal_tokens=find_refusal_tokens(tok, REFUSAL_TOKEN_PHRASES),
                  batch_size=batch_size, progress=False)
    car = fit_carriers(cap, min_filtered=cfg.min_filtered)
    notes: list[str] = []
    mt = stage_metrics(cap, car, None, None, cfg, L, layer, "eoi-1", f"fixed layer {layer} (no selection)", notes)
    m = mt["metrics"]
    out = {"layer": layer, "position": "eoi-1", "n_layers": L, "r_fit": car.r_fit, "fit_note": car.fit_note,
           "counts": car.counts, "coupling": m["coupling"], "effective_rank": m["effective_rank"],
           "effective_rank_delta_top5": m["effective_rank_delta_top5"], "subspace_coupling": m["subspace_coupling"],
           "principal_angles_deg": m["principal_angles_deg"], "process_correlation": m["process_correlation"],
           "latent_guard_auroc": m["latent_guard"]["auroc"], "refusal_score_rate": m["refusal_rate"], "notes": notes}
    post = car.post_names.index("eoi-1")
    tensors = {"H": car.H.float().contiguous(), "R": car.R[:, post].float().contiguous(),
               "Q_H_layers": mt["Q_H_layers"].contiguous(), "Q_R_layers": mt["Q_R_layers"].contiguous()}
    return out, tensors


def _q(Q: torch.Tensor) -> torch.Tensor:
    return Q[:, ~torch.isnan(Q).any(0)]


def drift(t: dict, ref: dict, layer_index: int) -> dict:
    """Drift of anchor tensors ``t`` from ``ref`` (PROTOCOL 3) at one layer: 1 - |cos| of R and H, and the mean
    principal angle (degrees) of the Q_R / Q_H subspaces (None where a carrier is zero or a subspace empty)."""
    from pysafegeom.protocol.metrics import direction_drift, subspace_drift

    i = layer_index
    out = {}
    for k in ("R", "H"):
        a, b = t[k][i], ref[k][i]
        out[f"{k}_direction_drift"] = direction_drift(a, b) if a.norm() > 0 and b.norm() > 0 else None
    for k in ("Q_R", "Q_H"):
        a, b = _q(t[f"{k}_layers"][i]), _q(ref[f"{k}_layers"][i])
        n = min(a.shape[1], b.shape[1])
        out[f"{k}_subspace_drift_deg"] = subspace_drift(a[:, :n], b[:, :n]) if n else None
    return out


def save_tensors(path: Path, tensors: dict) -> None:
    from safetensors.torch import save

    from pysafegeom._io import atomic_write_bytes

    atomic_write_bytes(path, save(tensors))


def load_tensors(path: Path) -> dict | None:
    from safetensors.torch import load_file

    return load_file(str(path)) if path.is_file() else None


def run_selection(model, tok, geo: dict[str, list[str]], out: Path, name: str, stride: int) -> dict:
    """``--select``: :func:`pysafegeom.analyze` on the fit prompts (its own train/val/test split of them), coarse grid."""
    from pysafegeom.pipelines.analyze import analyze

    folder = out / "analysis" / name
    res = analyze(model, tokenizer=tok, harmful=geo["harmful"], harmless=geo["harmless"], xstest=geo["xstest_readout"],
                  selection_layer_stride=stride, n_val=16, progress=False, out=folder, resume=True)
    c = res.metrics["coupling"]
    return {"folder": str(folder), "outcome": res.selection.outcome, "layer": res.selection.layer,
            "position": res.selection.position, "reference": res.metrics["reference"],
            "kappa_at_reference": c["at_reference"], "kappa_mid_band_mean": c["mid_band_mean"],
            "effective_rank": res.metrics["effective_rank"], "layer_stride": stride}


# ------------------------------------------------------------------------------------------ one anchor

def measure(anchor: Anchor, ctx: dict, args) -> dict:
    """Every group for one anchor; written to ``<out>/<name>.json`` by the caller."""
    from pysafegeom.models import load_model

    out = Path(args.out)
    t = {"start": time.perf_counter()}
    beh = evaluate_public(anchor.spec, ctx["sets"], args.max_new_tokens, args.batch_size)
    t["behaviour"] = time.perf_counter()
    model, tok = load_model(anchor.spec, device="cpu")
    model.eval()
    fs = measure_fixed_source(model, tok, anchor.name, *ctx["fixed"], out, args)
    t["fixed_source"] = time.perf_counter()
    with torch.no_grad():
        geo, tensors = measure_geometry(model, tok, ctx["geo"], ctx["layer"], args.batch_size)
    save_tensors(out / f"{anchor.name}.carriers.safetensors", tensors)
    ref = reference_of(anchor, ctx["anchors"])
    if ref is not None:
        rt = load_tensors(out / f"{ref.name}.carriers.safetensors")
        geo["drift"] = {"reference": ref.name, **drift(tensors, rt, ctx["layer"])} if rt is not None else None
    t["geometry"] = time.perf_counter()
    selection = run_selection(model, tok, ctx["geo"], out, anchor.name, args.select_stride) if args.select else None
    t["end"] = time.perf_counter()
    s = beh["sets"]
    res = {
        "trajectory": anchor.trajectory, "step": anchor.step, "model": anchor.spec, "shared_by": anchor.shared_by,
        "settings": ctx["settings"], "training_prompts": ctx["trained"].get(anchor.name, 0),
        "direct_request": {"set": "HarmBench test standard", "judge": s["harmbench_test"]["judge"],
                           "refused": s["harmbench_test"]["refused"]},
        "fixed_source": fs,
        "xstest": {"judge": s["xstest_safe"]["judge"], "any_refusal": s["xstest_safe"]["refused"]},
        "utility": {"set": f"alpaca_eval, the first {s['alpaca_eval']['answered']['n']} instructions",
                    "answered": s["alpaca_eval"]["answered"], "reference_ce": s["alpaca_eval"]["reference_ce"]},
        "geometry": {**geo, "sets": ctx["geo_record"]},
        "selection": selection,
        "seconds": {"behaviour": t["behaviour"] - t["start"], "fixed_source": t["fixed_source"] - t["behaviour"],
                    "geometry": t["geometry"] - t["fixed_source"], "selection": t["end"] - t["geometry"],
                    "total": t["end"] - t["start"]},
        "samples": {n: v["samples"] for n, v in s.items()},
    }
    return res


def refresh_fixed_source(res: dict, anchor: Anchor, ctx: dict, args) -> dict:
    """Re-measure group 2 alone (the store has grown); replay's cache keeps the cases generated before."""
    from pysafegeom.models import load_model

    t0 = time.perf_counter()
    model, tok = load_model(anchor.spec, device="cpu")
    model.eval()
    res["fixed_source"] = measure_fixed_source(model, tok, anchor.name, *ctx["fixed"], Path(args.out), args)
    dt = time.perf_counter() - t0
    res["seconds"]["fixed_source_refresh"] = dt
    res["seconds"]["total"] += dt
    return res


def add_selection(res: dict, anchor: Anchor, ctx: dict, args) -> dict:
    """``--select`` on an anchor measured without it: the selection alone."""
    from pysafegeom.models import load_model

    t0 = time.perf_counter()
    model, tok = load_model(anchor.spec, device="cpu")
    res["selection"] = run_selection(model, tok, ctx["geo"], Path(args.out), anchor.name, args.select_stride)
    res["seconds"]["selection"] = dt = time.perf_counter() - t0
    res["seconds"]["total"] += dt
    return res


def write_json(path: Path, d: dict) -> None:
    from pysafegeom._io import atomic_write_text, json_safe

    atomic_write_text(path, json.dumps(json_safe(d), indent=1, ensure_ascii=False, allow_nan=False) + "\n")


def one_line(r: dict) -> str:
    fs = r["fixed_source"]
    per = fs.get("per_method", {})
    g = r["geometry"]
    d = g.get("drift") or {}
    return (f"direct refused {fmt_rate(r['direct_request']['refused'])}; "
            + "; ".join(f"fixed-source {m} ASR {fmt_rate(v)}" for m, v in per.items())
            + ("" if per else f"fixed-source {fs['status']}")
            + f"; XSTest any-refusal {fmt_rate(r['xstest']['any_refusal'])}; alpaca answered "
            f"{fmt_rate(r['utility']['answered'])}, CE {r['utility']['reference_ce']:.3f}; kappa mid "
            f"{_f(g['coupling']['mid_band_mean'])} max {_f(g['coupling']['max'])}; erank {_f(g['effective_rank'])}"
            + (f"; R drift {_f(d.get('R_direction_drift'))}" if d else ""))


# ------------------------------------------------------------------------------------------ table and plot

def _f(v, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def read_results(out: Path) -> dict[str, dict]:
    res = {}
    for f in sorted(out.glob("*-*.json")):
        try:
            d = json.loads(f.read_text(encoding="utf-8"))
        except ValueError:
            continue
        if isinstance(d, dict) and "trajectory" in d and "step" in d:
            res[f.stem] = d
    return res


def rows_of(results: dict[str, dict], trajectories: list[str] | None) -> list[tuple[str, dict, bool]]:
    """``(trajectory, result, shared base?)`` in trajectory order, then by step; step 0 from the shared base unless
    the trajectory has its own."""
    base = results.get(f"{BASE}-0")
    names = trajectories or list(dict.fromkeys(
        [t for r in results.values() if r["trajectory"] == BASE for t in r.get("shared_by", [])]
        + sorted({r["trajectory"] for r in results.values() if r["trajectory"] != BASE})))
    rows = []
    for traj in names:
        mine = sorted((r for r in results.values() if r["trajectory"] == traj), key=lambda r: r["step"])
        if base is not None and not any(r["step"] == 0 for r in mine):
            rows.append((traj, base, True))
        rows += [(traj, r, False) for r in mine]
    return rows


def _asr(r: dict, method: str) -> dict | None:
    return (r["fixed_source"].get("per_method") or {}).get(method)


def consecutive_drift(out: Path, rows) -> dict[int, dict]:
    """Drift of each row from the previous row of its trajectory (PROTOCOL 3, consecutive-anchor drift)."""
    res, prev = {}, {}
    for i, (traj, r, shared) in enumerate(rows):
        t = load_tensors(out / f"{BASE if shared else traj}-{r['step']}.carriers.safetensors")
        p = prev.get(traj)
        if t is not None and p is not None:
            res[i] = drift(t, p, r["geometry"]["layer"])
        if t is not None:
            prev[traj] = t
    return res


def _selected(sel: dict | None) -> str:
    if not sel:
        return "—"
    ref = sel["reference"]
    where = (f"L{sel['layer']} {sel['position']}" if sel["layer"] is not None
             else f"none (ref L{ref['layer']} {ref['position']})")
    return f"{where}, κ {_f(sel['kappa_at_reference'])}"


def table(out: Path, rows) -> str:
    cons = consecutive_drift(out, rows)
    head = ["trajectory", "step", "HarmBench direct refused", "fixed-source GCG ASR", "fixed-source direct ASR",
            "XSTest any-refusal", "alpaca answered", "alpaca ref CE", "κ mid-band", "κ max (layer)", "erank",
            "R drift vs 0", "Q_R drift° vs 0", "R drift vs prev", "s"]
    selected = any(r.get("selection") for _, r, _ in rows)
    if selected:
        head.insert(-1, "selected carrier (--select)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, (traj, r, shared) in enumerate(rows):
        g, d = r["geometry"], r["geometry"].get("drift") or {}
        cells = [traj, f"{r['step']}" + (" (base)" if shared else ""),
                 fmt_rate(r["direct_request"]["refused"]),
                 *(fmt_rate(v) if v else r["fixed_source"]["status"] for v in (_asr(r, "gcg"), _asr(r, "direct"))),
                 fmt_rate(r["xstest"]["any_refusal"]), fmt_rate(r["utility"]["answered"]),
                 _f(r["utility"]["reference_ce"]), _f(g["coupling"]["mid_band_mean"]),
                 f"{_f(g['coupling']['max'])} ({g['coupling']['argmax']})", _f(g["effective_rank"]),
                 _f(d.get("R_direction_drift")) if d else "—", _f(d.get("Q_R_subspace_drift_deg"), 1) if d else "—",
                 _f(cons[i]["R_direction_drift"]) if i in cons else "—", f"{r['seconds']['total']:.0f}"]
        if selected:
            cells.insert(-1, _selected(r.get("selection")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def header(rows) -> list[str]:
    rs = [r for _, r, _ in rows]
    st = rs[0]["settings"]
    geo = rs[0]["geometry"]
    lines = [f"Greedy, max_new_tokens {st['max_new_tokens']} (fixed-source replay {st['replay_max_new_tokens']}); rates "
             f"k/n share [95% Wilson]; substring judge (the R2D2 string counts as a refusal), XSTest judge for "
             f"any-refusal; CE in nats/token on the alpaca_eval reference outputs. Carriers at the fixed layer "
             f"{geo['layer']} of {geo['n_layers']}, eoi-1, no selection; κ = |cos(H, R)| same layer, mid band "
             f"{geo['coupling']['mid_band']}; drift 1 - |cos| (R) and mean principal angle (Q_R, k = 3) against the "
             f"trajectory's step 0."]
    bases = [r for _, r, shared in rows if shared]
    if bases:
        sharing = sorted({t for t, _, shared in rows if shared})  # the trajectories in this table, not at measure time
        lines.append(f"Step 0 is the base model {bases[0]['model']}, measured once ({BASE}-0.json) and shared by: "
                     f"{', '.join(sharing)}.")
    if st.get("limit"):
        lines.append(f"DEBUG RUN: --limit {st['limit']} (the first {st['limit']} prompts of every set).")
    ns = {(r.get("fixed_source") or {}).get("n_test_cases") for r in rs}
    if len(ns) > 1:
        lines.append(f"Note: the anchors replayed different numbers of fixed-source test cases ({sorted(map(str, ns))}); "
                     f"rerun to bring them to the store's current cases.")
    fits = {r["geometry"]["sets"]["fit_sha256_16"] for r in rs}
    if len(fits) > 1:
        lines.append(f"Note: the anchors were fitted on different fit prompts ({len(fits)} fit hashes).")
    return lines


def plot(out: Path, rows) -> str:
    """A multi-panel SVG (2 columns) of every metric against step, one line per trajectory."""
    from pysafegeom.report.svg import line_chart

    def rate(x):
        return x["rate"] if x else float("nan")

    panels = [
        ("HarmBench direct refused", lambda r: rate(r["direct_request"]["refused"]), (0, 1)),
        ("fixed-source GCG ASR", lambda r: rate(_asr(r, "gcg")), (0, 1)),
        ("XSTest any-refusal", lambda r: rate(r["xstest"]["any_refusal"]), (0, 1)),
        ("alpaca answered", lambda r: rate(r["utility"]["answered"]), (0, 1)),
        ("alpaca reference CE (nats/token)", lambda r: r["utility"]["reference_ce"], None),
        ("κ mid-band mean", lambda r: r["geometry"]["coupling"]["mid_band_mean"], None),
        ("effective rank", lambda r: r["geometry"]["effective_rank"], None),
        ("R drift vs step 0 (1 - |cos|)", lambda r: ((r["geometry"].get("drift") or {}).get("R_direction_drift")
                                                     if r["step"] else 0.0), None),
    ]
    w, h = 420, 240
    parts = []
    for i, (title, fn, ylim) in enumerate(panels):
        series = {}
        for traj, r, _ in rows:
            v = fn(r)
            xs, ys = series.setdefault(traj, ([], []))
            xs.append(r["step"])
            ys.append(float("nan") if v is None else float(v))
        svg = line_chart(series, title, "step", "", width=w, height=h, ylim=ylim)
        parts.append(svg.replace("<svg ", f'<svg x="{(i % 2) * w}" y="{(i // 2) * h}" ', 1))
    n_rows = (len(panels) + 1) // 2
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * w}" height="{n_rows * h}" '
            f'viewBox="0 0 {2 * w} {n_rows * h}">\n' + "\n".join(parts) + "\n</svg>\n")


def write_table(out: Path, trajectories: list[str] | None) -> str:
    from pysafegeom._io import atomic_write_text

    rows = rows_of(read_results(out), trajectories)
    if not rows:
        raise SystemExit(f"no measured anchors in {out}")
    text = "\n".join(header(rows)) + "\n\n" + table(out, rows) + "\n"
    atomic_write_text(out / "table.md", text)
    atomic_write_text(out / "trajectories.svg", plot(out, rows))
    return text


# ------------------------------------------------------------------------------------------ main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trajectory", action="append", type=parse_trajectory, default=[],
                    help="NAME=FOLDER of checkpoint-N folders (repeat for each trajectory)")
    ap.add_argument("--base", default=None, help="the step-0 model (default: the checkpoints' train_config.json "
                                                 f"base_model, else {DEFAULT_BASE})")
    ap.add_argument("--fixed-source", default=str(ROOT / "trajectories" / "fixed_source" / "gcg"),
                    help="test-case store to replay ('' to skip)")
    ap.add_argument("--out", default=str(ROOT / "trajectories" / "measure"))
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--replay-max-new-tokens", type=int, default=64)
    ap.add_argument("--n-alpaca", type=int, default=100)
    ap.add_argument("--n-fit", type=int, default=128, help="fit prompts per side (Arditi: 128)")
    ap.add_argument("--layer", type=int, default=None, help="fixed carrier layer (default int(0.6 L))")
    ap.add_argument("--limit", type=int, default=None, help="debug: the first N prompts (and test cases) of every set")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--select", action="store_true", help="also run pysafegeom.analyze (carrier selection) per anchor")
    ap.add_argument("--select-stride", type=int, default=3, help="--select: evaluate every n-th layer")
    ap.add_argument("--table-only", action="store_true", help="rebuild table.md and trajectories.svg from the JSONs")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    folders = dict(args.trajectory)
    if len(folders) != len(args.trajectory):
        raise SystemExit("two --trajectory options have the same name")
    if args.table_only:
        print(write_table(out, list(folders) or None))
        return 0
    if not folders:
        raise SystemExit("give at least one --trajectory NAME=FOLDER (or --table-only)")
    from pysafegeom._io import check_output_path, mark_dir, read_marker
    from pysafegeom.errors import DataOverlap
    from pysafegeom.refusal import is_refusal

    assert is_refusal("Sorry, I can't do that."), "the R2D2 refusal string must count as a refusal"
    check_output_path(out, kind="dir", content=CONTENT)
    data = Path(args.data).resolve()
    base = args.base or base_of(folders) or DEFAULT_BASE
    anchors, notes = find_anchors(folders, base)
    for n in notes:
        print(n)

    # every prompt set, and the hygiene check, before any model is measured
    sets = behaviour_sets(data, args.n_alpaca, args.limit)
    fixed = open_fixed_source(args.fixed_source, args.limit)
    print(f"fixed source: {fixed[2]}")
    trained = sorted({p for a in anchors for p in (training_record(a.spec) or [])})
    geo, geo_record = geometry_sets(data, sets, args.n_fit, args.limit, trained)
    evaluated = {**{k: v["prompts"] for k, v in sets.items()}, "fixed-source test cases and behaviours":
                 fixed_source_prompts(fixed[0]), **{f"readout {k}": geo[k] for k in ("harmless_test",)}}
    try:
        counts = check_hygiene(anchors, evaluated)
    except DataOverlap as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if geo_record["dropped"]:
        print(f"fit prompts left out (trained on, or readout prompts): {geo_record['dropped']}")
    L = n_layers(base)
    layer = args.layer if args.layer is not None else int(0.6 * L)
    if not 1 <= layer < L:
        raise SystemExit(f"--layer must lie in 1..{L - 1}, got {layer}")
    settings = {"max_new_tokens": args.max_new_tokens, "replay_max_new_tokens": args.replay_max_new_tokens,
                "n_alpaca": args.n_alpaca, "n_fit": args.n_fit, "limit": args.limit, "layer": layer,
                "data": str(data), "base": base, "batch_size": args.batch_size, "threads": args.threads}
    ctx = {"sets": sets, "fixed": fixed, "geo": geo, "geo_record": geo_record, "layer": layer, "anchors": anchors,
           "settings": settings, "trained": counts}
    out.mkdir(parents=True, exist_ok=True)
    if read_marker(out) is None:
        mark_dir(out, CONTENT)

    for i, a in enumerate(anchors, 1):
        f = out / f"{a.name}.json"
        tag = f"[{i}/{len(anchors)}] {a.name} ({a.spec})"
        if f.is_file():
            res = json.loads(f.read_text(encoding="utf-8"))
            changed = [k for k in SETTINGS if res["settings"].get(k) != settings[k]]
            if changed:
                was = ", ".join(f"{k}={res['settings'].get(k)!r}" for k in changed)
                raise SystemExit(f"{f} was measured with other settings ({was}); use another --out or the same options")
            if fixed[0] is not None and res["fixed_source"].get("keys") != fixed[1]:
                was = len(res["fixed_source"].get("keys") or [])
                print(f"{tag}: fixed-source cases changed ({was} -> {len(fixed[1])}); re-measuring that group", flush=True)
                res = refresh_fixed_source(res, a, ctx, args)
                write_json(f, res)
                print(f"{tag}: {one_line(res)}; {res['seconds']['fixed_source_refresh']:.0f} s", flush=True)
            elif args.select and res.get("selection") is None:
                print(f"{tag}: measured without --select; running the selection alone", flush=True)
                res = add_selection(res, a, ctx, args)
                write_json(f, res)
            else:
                print(f"{tag}: done already, skipped", flush=True)
            continue
        print(f"{tag}: measuring", flush=True)
        res = measure(a, ctx, args)
        write_json(f, res)
        sec = res["seconds"]
        print(f"{tag}: {one_line(res)}; {sec['total']:.0f} s (behaviour {sec['behaviour']:.0f}, fixed source "
              f"{sec['fixed_source']:.0f}, geometry {sec['geometry']:.0f}"
              + (f", selection {sec['selection']:.0f}" if args.select else "") + ")", flush=True)
    print()
    print(write_table(out, list(folders)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
