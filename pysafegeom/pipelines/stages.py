"""The stages of :func:`pysafegeom.analyze`, each a plain function writing one artifact, and the store that resumes them.

    sets      -> which prompts fit, select, read out and judge (disjoint splits; checked against the
                 model's recorded training prompts)
    encode    -> every prompt set tokenised once with the chat template, handed to capture and selection
                 (the reopen table and the sweeps generate from the texts and tokenise them themselves)
    capture   -> streamed per-set sums and kept per-prompt rows (``capture.pt``)
    carriers  -> H and R per layer (cheap: refitted from the capture)
    selection -> every candidate's bypass / induce / KL and the outcome (``selection.pt``)
    metrics   -> coupling, subspaces, effective rank, readouts, Latent Guard (cheap; recomputed)
    reopen    -> the reopen table and the diagnostics (``reopen.pt``)
    sweeps    -> ActAdd and partial-ablation sweeps (``sweeps.pt``)

With ``analyze(..., out=DIR)`` the artifacts go to the hidden folder ``.DIR.stages`` beside ``DIR``;
``resume=True`` loads every artifact whose fingerprint (model, configuration, prompt sets) matches
and recomputes the rest, so an interrupted analysis continues at the stage it reached. The folder is
removed once the result is saved.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import DataOverlap, InvalidArgument
from .. import validate as V
from ..models.provenance import training_prompts
from ..validate import overlap
from ..protocol import metrics as M
from ..protocol.capture import Capture
from ..protocol.carriers import fit_subspace, layer_subspaces

# --------------------------------------------------------------------------------------------- sets


@dataclass
class PromptSets:
    """The prompt texts each stage uses; fitting, selection, readouts and judging never share a prompt.

    (``stage_sets`` raises :class:`~pysafegeom.errors.DataOverlap` when the harmful and harmless sets, or
    two splits of one set, share a prompt.)

    ``harmful`` / ``harmless``: ``{"train": [...], "val": [...], "test": [...]}``. Carriers are fitted
    on ``train``, candidates selected on ``val``, readouts, rho, the Latent Guard and the reopen table use
    ``test`` (the reopen table's KL runs on ``harmless["test"]``). ``xstest_readout``: the held-out
    XSTest-style safe prompts for readouts (val + test splits when the set has splits);
    ``xstest_eval``, ``xstest_unsafe``, ``benign``: the behavioural evaluation prompts (test splits).
    """

    harmful: dict[str, list[str]]
    harmless: dict[str, list[str]]
    xstest_readout: list[str]
    xstest_eval: list[str] = field(default_factory=list)
    xstest_unsafe: list[str] = field(default_factory=list)
    benign: list[str] = field(default_factory=list)
    benign_references: list[str] | None = None
    attacks: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    overlap_override: dict[str, int] = field(default_factory=dict)

    def record(self) -> dict:
        """What the result records about its splits: counts and a hash of each split's texts."""
        def h(texts):
            return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16] if texts else None
        out = {}
        for role in ("harmful", "harmless"):
            for s, texts in getattr(self, role).items():
                out[f"{role}_{s}"] = {"n": len(texts), "sha256_16": h(texts)}
        for name in ("xstest_readout", "xstest_eval", "xstest_unsafe", "benign", "attacks"):
            texts = getattr(self, name) or []
            out[name] = {"n": len(texts), "sha256_16": h(texts)}
        out["uses"] = {"fit carriers": "harmful_train, harmless_train", "select": "harmful_val, harmless_val",
                       "readouts / rho / Latent Guard": "harmful_test, harmless_test, xstest_readout",
                       "reopen table": "harmful_test (+ attacks), harmless_test (KL), xstest_eval, xstest_unsafe, benign"}
        return out


def _load(spec, role: str):
    from ..data import load_prompts

    return load_prompts(spec, role=role)


def _split_user(spec, role: str, notes: list[str]) -> dict[str, list[str]]:
    """train / val / test prompt texts: bundled splits, a file's own splits, or a deterministic split."""
    from ..data import split_prompts

    prompts = _load(spec, role)
    if not prompts:
        raise InvalidArgument(f"the {role} prompt set is empty")
    if any(getattr(p, "split", None) is None for p in prompts):
        prompts = split_prompts(prompts)
    out = {s: [p.text for p in prompts if p.split == s] for s in ("train", "val", "test")}
    if len(out["train"]) < 2:
        raise InvalidArgument(f"the {role} set has {len(out['train'])} training prompts; at least 2 are needed "
                              f"(give at least ~10 prompts in all)")
    for s in ("val", "test"):
        if not out[s]:  # tiny sets: reuse training prompts rather than fail, and say so
            out[s] = out["train"][: max(1, len(out["train"]) // 2)]
            notes.append(f"the {role} set has no {s} prompts; {len(out[s])} training prompts were reused as {s} "
                         f"prompts (so its {s} figures are in-sample)")
        else:
            for other in ("train", "val") if s == "test" else ("train",):
                d = overlap(out[s], out[other])
                if d:
                    raise DataOverlap(f"the {role} set has {len(d)} prompt(s) in both its {other} and {s} splits, e.g. "
                                      f"{d[0]!r}: held-out figures would be in-sample; remove the duplicates")
    return out


def _held_out(spec, role: str, splits: tuple[str, ...], cap: int | None = None):
    """A set's prompts in ``splits`` when it has splits, else all of it; at most ``cap``."""
    prompts = _load(spec, role)
    if not prompts:
        raise InvalidArgument(f"the {role} prompt set is empty")
    if any(getattr(p, "split", None) in splits for p in prompts):
        prompts = [p for p in prompts if p.split in splits]
    return prompts[:cap] if cap else prompts


def stage_sets(model, harmful, harmless, xstest, *, xstest_unsafe=None, benign=None, attacks=None, cfg,
               allow_overlap: bool = False) -> PromptSets:
    """Resolve every prompt set, check the splits are disjoint and that none is in the model's training record."""
    notes: list[str] = []
    hf = _split_user(harmful, "harmful", notes)
    hl = _split_user(harmless, "harmless", notes)
    V.disjoint("the harmful set", hf["train"] + hf["val"] + hf["test"], "the harmless set",
               hl["train"] + hl["val"] + hl["test"])
    xs_read = [p.text for p in _held_out(xstest, "xstest_safe", ("val", "test"))]
    sets = PromptSets(hf, hl, xs_read, notes=notes)
    if cfg.interventions:
        bn = _held_out(benign, "benign", ("test",), cfg.n_behaviour)
        refs = [p.reference for p in bn]
        sets.xstest_eval = [p.text for p in _held_out(xstest, "xstest_safe", ("test",), cfg.n_behaviour)]
        sets.xstest_unsafe = [p.text for p in _held_out(xstest_unsafe, "xstest_unsafe", ("test",), cfg.n_behaviour)]
        sets.benign = [p.text for p in bn]
        sets.benign_references = refs if all(refs) else None
        sets.attacks = [p.text for p in _load(attacks, "attack")] if attacks is not None else None

    record = training_prompts(model)
    if record:
        found = {}
        named = {"harmful": hf["train"] + hf["val"] + hf["test"], "harmless": hl["train"] + hl["val"] + hl["test"],
                 "xstest_safe": xs_read + sets.xstest_eval, "xstest_unsafe": sets.xstest_unsafe,
                 "benign": sets.benign, "attacks": sets.attacks or []}
        for name, texts in named.items():
            o = overlap(texts, record)
            if o:
                found[name] = o
        if found:
            summary = ", ".join(f"{name}: {len(v)}" for name, v in found.items())
            example = next(iter(found.values()))[0]
            if not allow_overlap:
                raise DataOverlap(
                    f"the model was trained on prompts that this analysis would fit or judge on ({summary}; e.g. "
                    f"{example!r}). Its carriers and behaviour on its own training prompts say little about held-out "
                    f"ones: pass other prompt sets, or allow_overlap=True (--allow-overlap) to run anyway (recorded in "
                    f"the result)")
            sets.overlap_override = {name: len(v) for name, v in found.items()}
            notes.append(f"allow_overlap=True: the model was trained on some of these prompts ({summary}); figures on "
                         f"those sets are not held out")
    return sets


def encode_sets(tokenizer, texts: dict[str, list[str]], cfg, max_length: int | None = None) -> dict:
    """Every named prompt list tokenised once (:class:`~pysafegeom.prompts.EncodedPrompts`), for all stages."""
    from ..prompts import encode_prompts

    return {name: encode_prompts(tokenizer, t, template=cfg.template, system=cfg.system, max_length=max_length)
            for name, t in texts.items() if t}


# --------------------------------------------------------------------------------------------- store

def fingerprint(model, spec: str, cfg, sets: PromptSets) -> str:
    """A hash of what the stages' artifacts depend on: the model (spec, shape and a weight checksum), the
    configuration and the prompt sets."""
    # every parameter's sum and absolute sum: two checkpoints that differ in any tensor differ here (a probe of a
    # few tensors would let a fine-tune of the others reuse the base model's capture)
    from ..models.placement import parameter_values

    with torch.no_grad():  # (an offloaded parameter of a placed model: its stored value)
        stats = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().abs().sum()]).cpu()
                             for _, p in parameter_values(model)])
    d = {"spec": spec, "shapes": [list(p.shape) for p in model.parameters()], "weights": stats.tolist(),
         "config": asdict(cfg), "sets": sets.record()}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:24]


class StageStore:
    """Artifacts of finished stages in one folder, each tagged with the run's fingerprint.

    ``folder=None``: nothing is stored (a plain in-memory analysis). Artifacts are written atomically
    (temporary file, then rename), so a killed run leaves either the old artifact or none.
    """

    def __init__(self, folder: str | os.PathLike | None, fp: str, resume: bool = False):
        self.folder = Path(folder) if folder is not None else None
        self.fp = fp
        self.resume = resume
        self.loaded: list[str] = []
        self.stale: list[str] = []
        if self.folder is not None:
            if self.folder.exists() and not resume:
                shutil.rmtree(self.folder)
            self.folder.mkdir(parents=True, exist_ok=True)

    def load(self, name: str):
        if self.folder is None or not self.resume:
            return None
        f = self.folder / f"{name}.pt"
        if not f.is_file():
            return None
        try:
            blob = torch.load(f, weights_only=True)
        except (RuntimeError, EOFError, OSError, ValueError, KeyError, pickle.UnpicklingError) as exc:
            # a truncated or foreign artifact is recomputed, and said so
            self.stale.append(f"{name} (unreadable: {type(exc).__name__})")
            return None
        if blob.get("fingerprint") != self.fp:
            self.stale.append(f"{name} (model, configuration or prompts changed)")
            return None
        self.loaded.append(name)
        return blob["data"]

    def save(self, name: str, data) -> None:
        if self.folder is None:
            return
        import io

        from .._io import atomic_write_bytes

        buf = io.BytesIO()
        torch.save({"fingerprint": self.fp, "data": data}, buf)
        atomic_write_bytes(self.folder / f"{name}.pt", buf.getvalue())

    def remove(self) -> None:
        if self.folder is not None and self.folder.exists():
            shutil.rmtree(self.folder, ignore_errors=True)


def capture_to_blob(cap: Capture) -> dict:
    return {"set_names": cap.set_names, "layers": cap.layers, "position_names": cap.position_names, "sums": cap.sums,
            "counts": cap.counts, "per_prompt": cap.per_prompt, "scores": cap.scores, "n_tokens": cap.n_tokens,
            "n_padded_tokens": cap.n_padded_tokens}


def capture_from_blob(b: dict) -> Capture:
    return Capture(b["set_names"], b["layers"], b["position_names"], b["sums"], b["counts"], b["per_prompt"],
                   b["scores"], b["n_tokens"], b["n_padded_tokens"])


# --------------------------------------------------------------------------------------------- metrics

def _dprime(pos: torch.Tensor, neg: torch.Tensor) -> float:
    v = 0.5 * (pos.var() + neg.var())
    return float((pos.mean() - neg.mean()) / v.sqrt()) if v > 0 else float("nan")


def stage_metrics(cap: Capture, car, sel, sets: PromptSets, cfg, n_layers: int, ref_layer: int, ref_pos: str,
                  ref_why: str, notes: list[str]) -> dict:
    """PROTOCOL 3 at every layer and at the reference (selected) carrier. Returns a dict with ``metrics``,
    ``readouts``, ``separation``, ``Q_H``/``Q_R`` (at the reference carrier) and ``Q_H_layers``/``Q_R_layers``
    (``[n_layers, d, k]`` at t_inst / eoi-1, NaN-filled where a layer has fewer directions)."""
    li = car.layers.index(ref_layer)
    filtered = car.r_fit == "filtered"
    post_col = car.post_names.index("eoi-1")
    per_layer = M.layer_cos(car.H, car.R[:, post_col]).abs().tolist()  # NaN where a carrier is zero
    lo, hi = M.mid_band(n_layers)
    band = [v for l, v in zip(car.layers, per_layer) if lo <= l < hi and v == v]
    h_ref, r_ref = car.H[li], car.r_at(ref_layer, ref_pos)

    sub = fit_subspace(cap, ref_layer, ref_pos, cfg.k, filtered=filtered)
    notes.extend(sub.notes)
    k = min(sub.k_H, sub.k_R)
    Q_H, Q_R = sub.Q_H[:, :k], sub.Q_R[:, :k]
    angles = M.principal_angles(Q_H, Q_R) if k else torch.empty(0)
    eoi_units = car.R[li][car.R[li].norm(dim=-1) > 0]
    erank = M.effective_rank(eoi_units, unit_rows=True) if len(eoi_units) else float("nan")
    pos_rows = cap.scores["harmful"] > 0 if filtered else slice(None)
    neg_rows = ~(cap.scores["harmless"] > 0) if filtered else slice(None)
    X_r = cap.per_prompt["harmful"][ref_pos][:, li].double()[pos_rows]
    mu_neg = cap.per_prompt["harmless"][ref_pos][:, li].double()[neg_rows].mean(0)
    erank_delta5 = M.effective_rank(X_r - mu_neg, top=5)
    # per-layer subspaces at t_inst / eoi-1, for drift between checkpoints at a common layer
    per = layer_subspaces(cap, cfg.k, filtered=filtered)
    QH_layers, QR_layers = per.Q_H.float(), per.Q_R.float()

    # readouts, rho, Latent Guard: held-out prompts only (test splits and the held-out XSTest-style prompts)
    h_unit, r_unit = car.H[li], car.R[li, post_col]
    readouts, all_h, all_r = {}, [], []
    for name in ("harmful_test", "harmless_test", "xstest_readout"):
        ro = M.readouts(cap.per_prompt[name]["t_inst"][:, li].double(), cap.per_prompt[name]["eoi-1"][:, li].double(),
                        h_unit, r_unit)
        readouts[name] = {"h": ro.h.tolist(), "r": ro.r.tolist()}
        all_h.append(ro.h)
        all_r.append(ro.r)
    rho = M.process_correlation(torch.cat(all_h), torch.cat(all_r))
    c_hf = cap.mean("harmful")[:, 0]
    c_hl = cap.mean("harmless")[:, 0]
    Xt = torch.cat([cap.per_prompt["harmful_test"]["t_inst"], cap.per_prompt["harmless_test"]["t_inst"]]).double()
    labels = torch.tensor([1] * cap.count("harmful_test") + [0] * cap.count("harmless_test"))
    guard = M.latent_guard_scores(Xt, c_hf, c_hl)
    guard_xs = M.latent_guard_scores(cap.per_prompt["xstest_readout"]["t_inst"].double(), c_hf, c_hl)

    sep_h, sep_r = [], []  # in-sample d' along the unit carrier (training prompts; descriptive)
    for j in range(len(car.layers)):
        for store, pos, vec in ((sep_h, "t_inst", car.H[j]), (sep_r, "eoi-1", car.R[j, post_col])):
            if vec.norm() == 0:
                store.append(float("nan"))
                continue
            u = vec / vec.norm()
            store.append(_dprime(cap.per_prompt["harmful"][pos][:, j].double() @ u,
                                 cap.per_prompt["harmless"][pos][:, j].double() @ u))
    valid = [i for i, v in enumerate(per_layer) if v == v]
    metrics = {
        "coupling": {"per_layer": per_layer, "mid_band": [lo, hi],
                     "mid_band_mean": sum(band) / len(band) if band else float("nan"),
                     "max": max((per_layer[i] for i in valid), default=float("nan")),
                     "argmax": car.layers[max(valid, key=lambda i: per_layer[i])] if valid else None,
                     "at_reference": M.coupling(h_ref, r_ref) if h_ref.norm() > 0 and r_ref.norm() > 0 else float("nan")},
        "reference": {"layer": ref_layer, "position": ref_pos, "why": ref_why},
        "subspace_coupling": M.subspace_coupling(Q_H, Q_R) if k else float("nan"),
        "subspace_fit": {"layer": ref_layer, "Q_H_position": "t_inst", "Q_R_position": ref_pos,
                         "sets": car.r_fit, "k": k, "counts": sub.counts},
        "principal_angles_deg": [math.degrees(a) for a in angles.tolist()],
        "k": k,
        "effective_rank": erank,
        "effective_rank_delta_top5": erank_delta5,
        "process_correlation": rho,
        "latent_guard": {"auroc": M.auroc(guard, labels), "threshold": 0.0, "scored_on": "harmful_test, harmless_test",
                         "flagged_harmful_test": float((guard[labels == 1] >= 0).double().mean()),
                         "flagged_harmless_test": float((guard[labels == 0] >= 0).double().mean()),
                         "flagged_xstest_safe": float((guard_xs >= 0).double().mean())},
        "refusal_rate": {name: float((cap.scores[name] > 0).double().mean()) for name in cap.set_names} if cap.scores else {},
        "norms": {"H": car.H.norm(dim=-1).tolist(), "R_t_post_inst": car.R[:, post_col].norm(dim=-1).tolist()},
    }
    return {"metrics": metrics, "readouts": readouts, "separation": {"H_dprime": sep_h, "R_dprime": sep_r},
            "Q_H": Q_H.float(), "Q_R": Q_R.float(), "Q_H_layers": QH_layers, "Q_R_layers": QR_layers}


def reference_carrier(sel, L: int, relaxed: float) -> tuple[int, str, str]:
    """(layer, position, why) of the carrier the single-layer metrics and interventions use."""
    if sel.layer is not None:
        rule = getattr(sel, "rule", None)
        return sel.layer, sel.position, f"selected carrier ({sel.outcome}{', ' + rule + ' KL rule' if rule else ''})"
    # fallback: prefer a candidate that keeps the model intact (KL within the relaxed threshold, only induce
    # failing): the lowest bypass over all candidates is usually the one that breaks the model outright
    evaluated = [c for c in sel.candidates if not c.pruned and c.bypass == c.bypass and c.kl == c.kl]
    gentle = [c for c in evaluated if c.kl <= relaxed]
    best = min(gentle or evaluated, key=lambda c: c.bypass) if evaluated else None
    layer = best.layer if best else L // 2
    pos = best.position if best else "eoi-1"
    why = ("no admissible carrier: the candidate with the lowest bypass score among those with KL <= "
           f"{relaxed} (its induce score is negative; not admissible)" if gentle else
           "no admissible carrier: the evaluated candidate with the lowest bypass score (not admissible)")
    return layer, pos, why
