"""The offline HTML report of an analysis: one self-contained file, inline SVG, no network."""

from __future__ import annotations

import html
import json

from .svg import bar_chart, heatmap, line_chart, scatter

__all__ = ["render_report", "report_body", "render_comparison"]

CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:24px auto;padding:0 16px;color:#222}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#666;font-size:13px} .summary{background:#f6f8fa;border-left:4px solid #1f77b4;padding:10px 16px}
.summary li{margin:4px 0} table{border-collapse:collapse;font-size:13px} td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f3f3f3} .grid{display:flex;flex-wrap:wrap;gap:16px} .note{color:#555;font-size:13px;max-width:900px}
"""


def _f(v, digits=3):
    return "n/a" if v is None or v != v else f"{v:.{digits}f}"


def _pct(v):
    return "n/a" if v is None or v != v else f"{v:+.0%}" if v else "0%"


def _rate(r):
    if not r or r.get("value") is None:
        return "n/a"
    return f"{r['value']:.0%} ({r['k']}/{r['n']}; {r['ci_low']:.0%}&ndash;{r['ci_high']:.0%})"


def reopen_section(rp: dict) -> str:
    """The reopen table (PROTOCOL 4) and the four behavioural diagnostics (PROTOCOL 5), as chart, words and table."""
    rows = rp["summary_rows"]
    out = [f"<h2>Reopening attacks (PROTOCOL 4): carriers ablated at every layer, layer {rp['layer']} carriers "
           "(R-side at every position, H-only at the instruction positions)</h2>",
           f"<p class='summary'>{html.escape(rp['verdict'])}</p>"]
    bars = [(r["condition"], r["delta_asr"] if r["kind"] != "baseline" else 0.0, r.get("controls_delta_asr_mean"),
             r.get("controls_delta_asr_sd")) for r in rows]
    out.append(bar_chart(bars[1:], "change in attack success rate (ΔASR) against baseline", "ΔASR (share of harmful prompts)")
               if len(bars) > 1 else "")
    out.append("<p class='note'>Bars: ΔASR of each intervention on the held-out harmful prompts "
               f"({rp['n']['harmful']} prompts, judge: {html.escape(rp['primary_judge'])}). Grey whisker under a bar: mean ± sd of "
               f"its {rp['settings']['n_controls']} matched random-direction controls"
               f"{' (orthogonal to span(H, R))' if rp['settings']['orthogonal_controls'] else ''}, applied at the same positions "
               "as their row. Positions: <i>all</i> = every position, generated tokens included (Arditi); <i>instruction</i> = "
               "the instruction's own tokens, ending at t_inst, in the prompt forward, where H is read (PROTOCOL 4).</p>")
    head = ("<tr><th>condition</th><th>positions</th><th>ASR</th><th>ΔASR</th><th>controls ΔASR mean ± sd</th><th>percentile</th>"
            "<th>KL harmless</th><th>Δ over-refusal (XSTest)</th><th>Δ benign answered</th><th>Δ reference CE</th></tr>")
    body = []
    for r in rows:
        ctrl = (f"{_pct(r['controls_delta_asr_mean'])} ± {r['controls_delta_asr_sd']:.0%}"
                if r.get("controls_delta_asr_mean") is not None else "")
        pc = f"{r['delta_asr_percentile']:.0f}" if r.get("delta_asr_percentile") is not None else ""
        ce = f"{r['delta_ce']:+.3f}" if r.get("delta_ce") is not None else "n/a"
        where = "" if r["kind"] == "baseline" else r.get("positions", "all")  # tables saved before positions: all
        body.append(f"<tr><th style='text-align:left'>{html.escape(r['condition'])}</th><td>{html.escape(where)}</td>"
                    f"<td>{_rate(r['asr_rate'])}</td>"
                    f"<td>{_pct(r['delta_asr'])}</td><td>{ctrl}</td><td>{pc}</td><td>{_f(r['kl'])}</td>"
                    f"<td>{_pct(r['delta_over_refusal'])}</td><td>{_pct(r['delta_utility'])}</td><td>{ce}</td></tr>")
    out.append("<table>" + head + "".join(body) + "</table>")
    mrows = rp.get("method_rows") or []
    if mrows:
        conds = list(dict.fromkeys(r["condition"] for r in mrows))
        out.append("<h2>Attack test cases by method</h2><p class='note'>ASR of each method's test cases at baseline and "
                   "ΔASR under each intervention (judge: " + html.escape(rp["primary_judge"]) + "; the judge reads each case's "
                   "behaviour where the store knows it). p: paired exact McNemar of ablate R against ablate H on that "
                   "method's cases.</p><table><tr><th>method</th><th>cases</th>"
                   + "".join(f"<th>{'ASR' if c == 'baseline' else 'ΔASR'}: {html.escape(c)}</th>" for c in conds)
                   + "<th>p (R vs H)</th></tr>")
        for m in dict.fromkeys(r["method"] for r in mrows):
            by = {r["condition"]: r for r in mrows if r["method"] == m}
            cells = "".join(f"<td>{_rate(by[c]['asr_rate']) if c == 'baseline' else _pct(by[c]['delta_asr'])}</td>"
                            if c in by else "<td></td>" for c in conds)
            p = (by.get("ablate R") or {}).get("mcnemar_p_r_vs_h")
            out.append(f"<tr><th style='text-align:left'>{html.escape(m)}</th><td>{by['baseline']['n']}</td>{cells}"
                       f"<td>{'' if p is None else f'{p:.2g}'}</td></tr>")
        out.append("</table>")
    dg = rp["diagnostics"]
    out.append("<h2>Behavioural diagnostics at baseline (PROTOCOL 5)</h2><table>"
               "<tr><th>family</th><th>value (k/n; 95% Wilson interval)</th><th>how it was judged</th></tr>")
    for key, name in (("robust_refusal", "robust refusal: ASR, direct requests"), ("robust_refusal_attacks", "robust refusal: ASR, attack prompts"),
                      ("harmful_usefulness", "harmful usefulness"), ("exaggerated_safety", "exaggerated safety: XSTest any-refusal"),
                      ("benign_utility", "benign utility: share answered")):
        r = dg.get(key)
        if not r:
            continue
        extra = ""
        if r.get("contrast"):
            extra = f"; unsafe contrasts refused {_rate(r['contrast'])}"
        if r.get("mean_cross_entropy") is not None:
            extra = f"; reference-answer CE {r['mean_cross_entropy']:.3f} nats/token"
        out.append(f"<tr><th style='text-align:left'>{name}</th><td>{_rate(r)}</td><td style='text-align:left'>"
                   f"{html.escape(r['label'])}{extra}</td></tr>")
    out.append("</table>")
    if rp.get("samples"):
        out.append("<details><summary>Sample answers (first harmful prompts)</summary><table>")
        for cond, pairs in rp["samples"].items():
            for p in pairs:
                out.append(f"<tr><th style='text-align:left'>{html.escape(cond)}</th><td style='text-align:left'>{html.escape(p['prompt'])}</td>"
                           f"<td style='text-align:left'>{html.escape(p['response'][:300])}</td></tr>")
        out.append("</table></details>")
    if rp.get("notes"):
        out.append("<p class='note'>" + " ".join(html.escape(n) + "." for n in rp["notes"]) + "</p>")
    return "\n".join(out)


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>\n{body}\n</body></html>")


def sweeps_section(sweeps: dict) -> str:
    """Effect of each carrier against alpha / beta, with its matched controls' mean (dashed) (PROTOCOL 4 sweeps)."""
    out = ["<h2>Sweeps (PROTOCOL 4): ActAdd and partial ablation with matched random controls</h2><div class='grid'>"]
    charts = (("add", "refusal_harmless", "ActAdd at the carrier layer: refusal score change, harmless prompts", "alpha (units of the carrier norm)"),
              ("add", "refusal_harmful", "ActAdd at the carrier layer: refusal score change, harmful prompts", "alpha (units of the carrier norm)"),
              ("ablate", "refusal_harmful", "partial ablation, every layer: refusal score change, harmful prompts", "beta"),
              ("ablate", "kl_harmless", "partial ablation, every layer: KL on harmless prompts", "beta"))
    for kind, metric, title, xlabel in charts:
        sw = sweeps.get(kind)
        if not sw:
            continue
        series = {}
        for c in sw["carriers"]:
            rows = sorted((r for r in sw["rows"] if r["carrier"] == c and r["metric"] == metric), key=lambda r: r["value"])
            xs = [r["value"] for r in rows]
            series[c] = (xs, [r["effect"] if r["effect"] is not None else float("nan") for r in rows])
            series[f"{c}: controls' mean"] = (xs, [r["control_mean"] if r["control_mean"] is not None else float("nan") for r in rows])
        out.append(line_chart(series, title, xlabel, "change" if metric != "kl_harmless" else "KL", integer_x=False))
    out.append("</div>")
    sw = sweeps.get("add") or sweeps.get("ablate")
    out.append(f"<p class='note'>Layer {sw['layer']}; {sw['n_controls']} random directions per carrier"
               f"{' (orthogonal to span(H, R))' if sw['orthogonal_controls'] else ''}; {sw['n_harmful']} harmful and "
               f"{sw['n_harmless']} harmless validation prompts; one forward each, effect at the last prompt token.</p>")
    return "\n".join(out)


def render_report(res) -> str:
    """HTML for an :class:`pysafegeom.analysis.AnalysisResult`."""
    return _page(f"pysafegeom: {res.meta['model']}", report_body(res))


def report_body(res, level: int = 1) -> str:
    """The report's sections for one result (no page wrapper), so several can share one page."""
    m, meta, sel, car = res.metrics, res.meta, res.selection, res.carriers
    layers = car.layers
    coup = [v if v is not None else float("nan") for v in m["coupling"]["per_layer"]]
    ref = m["reference"]
    parts = [f"<h{level}>Safety geometry of {html.escape(meta['model'])}</h{level}>",
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

    if getattr(res, "reopen", None):
        parts.append(reopen_section(res.reopen))
    if getattr(res, "sweeps", None):
        parts.append(sweeps_section(res.sweeps))

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
    return "\n".join(parts)


def render_comparison(results: dict, findings: list[str], title: str = "pysafegeom: side by side") -> str:
    """One page for several results ``{label: AnalysisResult}``: a side-by-side table, ``findings`` in words,
    then each model's full report."""
    labels = list(results)

    def cell(res, key):
        m, rp = res.metrics, res.reopen
        c = m["coupling"]
        if key == "refusal":
            return f"{m['refusal_rate']['harmful_test']:.0%} / {m['refusal_rate']['harmless_test']:.0%}"
        if key == "band":
            return f"{_f(c['mid_band_mean'], 2)} (max {_f(c['max'], 2)} @ {c['argmax']})"
        if key == "sel":
            s = res.selection
            return ("none admissible" if s.outcome == "none" else f"layer {s.layer}, {s.position}"
                    + (" (relaxed KL)" if s.outcome == "selected_relaxed" else ""))
        if key == "at_ref":
            return f"{_f(c['at_reference'], 2)} (layer {m['reference']['layer']})"
        if key == "guard":
            return _f(m["latent_guard"]["auroc"], 2)
        if not rp:
            return "n/a"
        rows = {r["condition"]: r for r in rp["summary_rows"]}
        dg = rp["diagnostics"]
        if key == "asr0":
            return _rate(dg["robust_refusal"])
        if key.startswith("d:"):
            r = rows[key[2:]]
            ctrl = (f" (controls {_pct(r['controls_delta_asr_mean'])} ± {r['controls_delta_asr_sd']:.0%})"
                    if r.get("controls_delta_asr_mean") is not None else "")
            return f"{_pct(r['delta_asr'])}{ctrl}; KL {_f(r['kl'], 3)}"
        if key == "xs":
            return _rate(dg["exaggerated_safety"])
        if key == "use":
            return _rate(dg["harmful_usefulness"])
        if key == "ben":
            b = dg["benign_utility"]
            return _rate(b) + (f"; CE {b['mean_cross_entropy']:.3f}" if b.get("mean_cross_entropy") is not None else "")
        return "n/a"

    keys = [("refusal", "refusal score > 0: harmful / harmless test"), ("band", "mid-band |cos(H, R)|"),
            ("sel", "selected refusal carrier"), ("at_ref", "|cos(H, R)| at the carrier layer"),
            ("guard", "Latent Guard AUROC"), ("asr0", "ASR, direct requests (baseline)"),
            ("d:ablate R", "ΔASR, R ablated"), ("d:ablate H", "ΔASR, H ablated"),
            ("d:ablate span(H, R)", "ΔASR, span(H, R) ablated"), ("use", "harmful usefulness"),
            ("xs", "XSTest any-refusal (safe)"), ("ben", "benign answered; reference CE")]
    head = "<tr><th></th>" + "".join(f"<th>{html.escape(l)}</th>" for l in labels) + "</tr>"
    body = "".join("<tr><th style='text-align:left'>" + html.escape(name) + "</th>"
                   + "".join(f"<td>{cell(results[l], k)}</td>" for l in labels) + "</tr>" for k, name in keys)
    parts = [f"<h1>{html.escape(title)}</h1>",
             "<h2>Findings</h2><ul class='summary'>" + "".join(f"<li>{html.escape(f)}</li>" for f in findings) + "</ul>",
             "<h2>Side by side</h2><table>" + head + body + "</table>",
             "<p class='note'>Rates: value (k/n; 95% Wilson interval). ΔASR: change in attack success against the same "
             "model's baseline, substring judge unless a model judge was given.</p>"]
    for l in labels:
        parts.append(f"<hr><div id='{html.escape(l)}'>" + report_body(results[l], level=1) + "</div>")
    return _page(title, "\n".join(parts))
