"""The offline HTML report of an analysis: one self-contained file, inline SVG, no network."""

from __future__ import annotations

import html
import json

from .svg import heatmap, line_chart, scatter

__all__ = ["render_report"]

CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:24px auto;padding:0 16px;color:#222}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#666;font-size:13px} .summary{background:#f6f8fa;border-left:4px solid #1f77b4;padding:10px 16px}
.summary li{margin:4px 0} table{border-collapse:collapse;font-size:13px} td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f3f3f3} .grid{display:flex;flex-wrap:wrap;gap:16px} .note{color:#555;font-size:13px;max-width:900px}
"""


def _f(v, digits=3):
    return "n/a" if v is None or v != v else f"{v:.{digits}f}"


def render_report(res) -> str:
    """HTML for an :class:`pysafegeom.analysis.AnalysisResult`."""
    m, meta, sel, car = res.metrics, res.meta, res.selection, res.carriers
    layers = car.layers
    coup = [v if v is not None else float("nan") for v in m["coupling"]["per_layer"]]
    ref = m["reference"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>pysafegeom: {html.escape(meta['model'])}</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>Safety geometry of {html.escape(meta['model'])}</h1>",
             f"<div class='meta'>{html.escape(meta['arch'])}, {meta['n_layers']} layers, d = {meta['d_model']}, {html.escape(meta['dtype'])}"
             f" &middot; {html.escape(meta['date'])} &middot; pysafegeom {html.escape(meta['pysafegeom'])}"
             f" &middot; run time {meta['timings_s']['total']} s</div>",
             "<h2>What was found</h2><ul class='summary'>" + "".join(f"<li>{html.escape(s)}</li>" for s in m.get("summary", [])) + "</ul>"]

    # coupling profile
    lo, hi = m["coupling"]["mid_band"]
    parts.append("<h2>Coupling profile |cos(H, R)| per layer</h2>")
    parts.append(line_chart({"|cos(H, R)| at t_post_inst": (layers, coup)}, "Same-layer coupling (PROTOCOL 3)", "layer (resid_pre)",
                            "|cos(H, R)|", ylim=(0, 1), vline=ref["layer"]))
    parts.append(f"<p class='note'>H is the harmful-minus-harmless mean difference at t_inst, R at t_post_inst (R fitted on the "
                 f"{html.escape(car.r_fit)} sets: {html.escape(car.fit_note)}). Mid band {lo} &le; l &lt; {hi}: mean "
                 f"{_f(m['coupling']['mid_band_mean'])}, max {_f(m['coupling']['max'])} at layer {m['coupling']['argmax']}. "
                 f"The dashed line marks the reference layer {ref['layer']} ({html.escape(ref['why'])}).</p>")

    # separation
    sep = res.separation
    parts.append("<h2>Separation of harmful and harmless prompts along H and R</h2>")
    parts.append(line_chart({"H at t_inst": (layers, [v if v is not None else float("nan") for v in sep["H_dprime"]]),
                             "R at t_post_inst": (layers, [v if v is not None else float("nan") for v in sep["R_dprime"]])},
                            "d' along each unit carrier (training prompts)", "layer (resid_pre)", "d'"))

    # selection heat map
    parts.append("<h2>Carrier selection (PROTOCOL 2.4)</h2>")
    pos_names = sorted({c.position for c in sel.candidates}, key=lambda p: car.post_names.index(p))
    sel_layers = sorted({c.layer for c in sel.candidates})
    grids = {}
    for key in ("bypass", "induce", "kl"):
        grids[key] = [[float("nan")] * len(pos_names) for _ in sel_layers]
    marks, best = set(), None
    for c in sel.candidates:
        i, j = sel_layers.index(c.layer), pos_names.index(c.position)
        for key in grids:
            grids[key][i][j] = getattr(c, key) if getattr(c, key) is not None else float("nan")
        if c.admissible:
            marks.add((i, j))
        if sel.layer == c.layer and sel.position == c.position:
            best = (i, j)
    row_labels = [f"layer {l}" for l in sel_layers]
    parts.append("<div class='grid'>")
    for key, label in (("bypass", "refusal score, carrier ablated (harmful)"), ("induce", "refusal score, carrier added (harmless)"),
                       ("kl", "KL on harmless, carrier ablated")):
        parts.append(heatmap(row_labels, pos_names, grids[key], f"{key} score", marks=marks, best=best, label=label))
    parts.append("</div>")
    outcome = {"selected": "selected at the KL threshold", "selected_relaxed": "selected only at the relaxed KL threshold",
               "none": "no admissible carrier"}[sel.outcome]
    parts.append(f"<p class='note'>Outcome: <b>{outcome}</b>. Admissible candidates (outlined): {sel.n_admissible} at KL &le; "
                 f"{sel.kl_threshold}, {sel.n_admissible_relaxed} at KL &le; {sel.relaxed_threshold}. Grey cells: pruned "
                 f"(last 20% of layers) or undefined. Baseline refusal score: harmful {_f(sel.baseline_harmful, 2)}, "
                 f"harmless {_f(sel.baseline_harmless, 2)}. {' '.join(html.escape(n) for n in sel.notes)}</p>")

    # readout scatter
    parts.append(f"<h2>Per-prompt readouts at layer {ref['layer']} (held-out prompts)</h2>")
    groups = {name: (ro["h"], ro["r"]) for name, ro in res.readouts.items()}
    parts.append(scatter(groups, "harmfulness readout vs refusal readout", "<x_t_inst, unit H>", "<x_t_post_inst, unit R>"))
    parts.append(f"<p class='note'>Process correlation (Spearman, PROTOCOL 3): {_f(m['process_correlation'])}.</p>")

    # numbers table
    lg = m["latent_guard"]
    rows = [("coupling at reference layer", _f(m["coupling"]["at_reference"])),
            (f"subspace coupling (k = {m['k']})", _f(m["subspace_coupling"])),
            ("principal angles (deg)", ", ".join(f"{a:.1f}" for a in m["principal_angles_deg"])),
            ("effective rank (unit EOI carriers)", _f(m["effective_rank"], 2)),
            ("effective rank (top-5 of per-prompt differences)", _f(m["effective_rank_delta_top5"], 2)),
            ("Latent Guard AUROC (held-out)", _f(lg["auroc"])),
            ("Latent Guard flags: harmful / harmless / XSTest-safe", f"{_f(lg['flagged_harmful_test'], 2)} / "
             f"{_f(lg['flagged_harmless_test'], 2)} / {_f(lg['flagged_xstest_safe'], 2)}")]
    rows += [(f"refusal rate: {k}", _f(v, 2)) for k, v in m["refusal_rate"].items()]
    parts.append("<h2>Numbers</h2><table>" + "".join(f"<tr><th style='text-align:left'>{html.escape(a)}</th><td>{html.escape(b)}</td></tr>"
                                                   for a, b in rows) + "</table>")
    parts.append("<h2>Run</h2><pre class='note'>" + html.escape(json.dumps({"config": res.config, "prompts": meta["n_prompts"],
                 "refusal_tokens": meta["refusal_token_strings"], "timings_s": meta["timings_s"]}, indent=1)) + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)
