"""The trajectory report: one self-contained HTML page (inline SVG, no network) of what
:func:`pysafegeom.pipelines.trajectory.trajectory` measured, every trajectory in the same charts.

Sections: the findings of PROTOCOL.md section 8 in words (shown or not, with the numbers), coupling,
attack success, XSTest and benign utility, carrier layer (relocation) and drift against step, the
transfer heat map (when a matrix was given), the correlation table with its permutation p-values, and
the full per-anchor table.
"""

from __future__ import annotations

import html
import json
import math

from . import _f, _page  # the number format and page wrapper of the analysis report
from .svg import line_chart

__all__ = ["render_trajectory_report", "trajectory_markdown"]

STATUS_COLOUR = {"shown": "#2ca02c", "not shown": "#d62728", "not measured": "#777", "cannot be judged": "#777"}


def _num(v):
    return float("nan") if v is None else float(v)


def row_value(row: dict, key: str):
    """The number a trajectory row holds for a geometry or behaviour key (None where it has none, or not finite)."""
    v = row.get(key)
    if isinstance(v, dict):
        v = v.get("value", v.get("asr"))
    if key == "fixed_source_asr":
        fs = row.get("fixed_source")
        v = fs["overall"]["asr"] if fs else None
    if key == "adaptive_asr":  # every method's attacks pooled (successes over attacks)
        ad = row.get("adaptive") or {}
        n = sum(m["n"] for m in ad.values())
        v = sum(m["k"] for m in ad.values()) / n if n else None
    if key == "drift_common_deg":
        v = (row.get("drift_first") or {}).get("common_deg")
    if key == "b_distance_first":
        v = row.get("b_distance_first")
    if key == "benign_ce":  # the reference-answer cross-entropy of the benign prompts (nats/token; lower is better)
        v = (row.get("benign_utility") or {}).get("mean_cross_entropy")
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else float(v)


_val = row_value


def _series(table: list[dict], fn) -> dict:
    """``{trajectory: (steps, values)}`` of ``fn(row)`` (None drawn as a gap)."""
    out: dict = {}
    for r in table:
        xs, ys = out.setdefault(r["trajectory"], ([], []))
        xs.append(r["step"])
        ys.append(_num(fn(r)))
    return out


def _chart(table, title, ylabel, fns: dict, ylim=None) -> str:
    """One chart; ``fns`` ``{label: fn}`` gives one line per trajectory and label (label "" for a single metric)."""
    series = {}
    for label, fn in fns.items():
        for t, xy in _series(table, fn).items():
            series[f"{t} {label}".strip()] = xy
    return line_chart(series, title, "step", ylabel, width=520, height=280, ylim=ylim)


def _rate_cell(r: dict | None) -> str:
    if not r:
        return "n/a"
    v = r.get("value", r.get("asr"))
    if v is None or v != v:
        return f"n/a (n = {r.get('n', 0)})"
    return f"{v:.2f} ({r['k']}/{r['n']}; {r['ci_low']:.2f}&ndash;{r['ci_high']:.2f})"


def _where(c: dict) -> str:
    """The carrier cell: the selected one, or the reference candidate where none was admissible."""
    return (f"L{c['layer']} {c['position']}" if c["layer"] is not None
            else f"none (ref. L{c['reference_layer']} {c['reference_position']})")


def _drift_cell(d: dict, dash: str) -> str:
    return f"{_f(d.get('common_deg'), 1)} / {_f(d.get('own_deg'), 1)}" if d else dash


def _correlation_rows(corr: dict) -> tuple[list[tuple[str, str, list[dict]]], list[str]]:
    """``(rows, undefined)``: per (geometry, behaviour) pair the cell of every group, and the pairs undefined in all."""
    groups = list(corr)
    index = {g: {(c["geometry"], c["behaviour"]): c for c in corr[g]} for g in groups}
    rows, undefined = [], []
    for c0 in corr[groups[0]]:
        key = (c0["geometry"], c0["behaviour"])
        cells = [index[g][key] for g in groups]
        if all(c["rho"] is None for c in cells):
            undefined.append(f"{key[0]} × {key[1]}")
        else:
            rows.append((*key, cells))
    return rows, undefined


def _adaptive_cell(ad: dict | None) -> str:
    if not ad:
        return "not run"
    return "; ".join(f"{html.escape(m)} {v['asr']:.2f} ({v['k']}/{v['n']})" for m, v in ad.items())


def _findings(findings: list[dict]) -> str:
    items = []
    for f in findings:
        c = STATUS_COLOUR.get(f["status"], "#777")
        items.append(f"<li><b style='color:{c}'>{html.escape(f['status'])}</b>: {html.escape(f['finding'])}. "
                     f"<span class='note'>{html.escape(f['evidence'])}</span></li>")
    return "<ul class='summary'>" + "".join(items) + "</ul>"


def _anchor_table(table: list[dict]) -> str:
    head = ["trajectory", "step", "carrier (layer, position)", "admissible", "κ mid band", "κ at carrier", "κ_sub",
            "erank", "direct ASR", "fixed-source ASR", "adaptive ASR", "harmful usefulness", "XSTest any-refusal", "benign answered",
            "drift vs first (common / own, °)", "drift vs previous (common / own, °)", "1 − |cos R| vs first",
            "‖b − b_first‖", "s"]
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for r in table:
        c = r["carrier"]
        df, dp = r.get("drift_first") or {}, r.get("drift_prev") or {}
        cells = [r["trajectory"], r["step"], _where(c), c["n_admissible"], _f(r["kappa_mid_band"]), _f(r["kappa_at_carrier"]),
                 _f(r["kappa_sub"]), _f(r["effective_rank"], 2), _rate_cell(r["direct_asr"]),
                 _rate_cell((r.get("fixed_source") or {}).get("overall")), _adaptive_cell(r.get("adaptive")),
                 _rate_cell(r["harmful_usefulness"]),
                 _rate_cell(r["xstest_any_refusal"]), _rate_cell(r["benign_utility"]),
                 _drift_cell(df, "&mdash;"), _drift_cell(dp, "&mdash;"),
                 _f(df.get("R_direction_drift")) if df else "&mdash;", _f(r.get("b_distance_first")),
                 f"{r['seconds']['total']:.0f}"]
        cells[:3] = [html.escape(str(x)) for x in cells[:3]]  # the rest are numbers and entities
        out.append("<tr>" + "".join(f"<td>{x}</td>" for x in cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _p(v) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def _correlation_table(corr: dict, meta: dict) -> str:
    groups = list(corr)
    out = [f"<p class='note'>Spearman ρ between each geometry metric and each behavioural metric, pooled over every "
           f"anchor and within each trajectory. p: permutation p-values, {html.escape(meta.get('p_values', ''))}; "
           "with so few anchors the exact p-value is the honest one (a perfect ρ = 1 over 5 anchors has two-sided p = "
           "2/5! = 0.017, over 3 anchors 2/3! = 0.33). Drift is measured against each trajectory's first anchor.</p>",
           "<table><tr><th>geometry</th><th>behaviour</th>"
           + "".join(f"<th>{html.escape(g)}: ρ (n)</th><th>p two-sided</th>" for g in groups) + "</tr>"]
    rows, undefined = _correlation_rows(corr)
    for gk, bk, group_cells in rows:
        cells = []
        for c in group_cells:
            rho = "n/a" if c["rho"] is None else f"{c['rho']:+.2f}"
            strong = c["p_two_sided"] is not None and c["p_two_sided"] < 0.05
            cells.append(f"<td>{'<b>' if strong else ''}{rho}{'</b>' if strong else ''} ({c['n']})</td>"
                         f"<td title='{html.escape(c.get('method') or c.get('note', ''))}'>{_p(c['p_two_sided'])}</td>")
        out.append(f"<tr><th style='text-align:left'>{html.escape(gk)}</th><th style='text-align:left'>"
                   f"{html.escape(bk)}</th>{''.join(cells)}</tr>")
    out.append("</table>")
    if undefined:
        out.append("<p class='note'>Undefined everywhere (a constant side, or fewer than 3 anchors with a value), left "
                   "out: " + html.escape(", ".join(undefined)) + ".</p>")
    return "\n".join(out)


def _transfer(tr: dict) -> str:
    from ..attacks.transfer import ALL, heatmap_svg

    out = ["<h2>Transfer (PROTOCOL 3, transfer analysis)</h2>"]
    m = tr.get("matrix")
    if m and m.get("cells"):
        out.append(heatmap_svg(m, ALL))
    out.append("<p class='note'>Transfer-ASR(s &#8594; t) over pairs of anchors (s &ne; t, all methods) against three "
               "predictors. Matched matrix names: " + html.escape(", ".join(tr["matched"]) or "none")
               + (("; not matched to an anchor: " + html.escape(", ".join(tr["unmatched"]))) if tr["unmatched"] else "")
               + ".</p><table><tr><th>predictor</th><th>ρ with transfer-ASR</th><th>n pairs</th><th>p two-sided</th>"
               "<th>how</th></tr>")
    names = {"kappa_gap": "|κ_s − κ_t| (mid band)", "drift_deg": "drift(s, t), common layer (°)",
             "b_distance": "‖b_s − b_t‖"}
    for k, t in tr["tests"].items():
        rho = "n/a" if t["rho"] is None else f"{t['rho']:+.2f}"
        out.append(f"<tr><th style='text-align:left'>{names[k]}</th><td>{rho}</td><td>{t['n']}</td>"
                   f"<td>{_p(t['p_two_sided'])}</td><td style='text-align:left'>"
                   f"{html.escape(t.get('method') or t.get('note', ''))}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


def render_trajectory_report(d: dict) -> str:
    """HTML for a trajectory result (the dict ``trajectory.json`` holds)."""
    table, meta = d["table"], d["meta"]
    trajs = meta["trajectories"]
    title = "pysafegeom: trajectories " + ", ".join(trajs)
    common = meta["common_layer"]
    parts = [f"<h1>{html.escape(title)}</h1>",
             "<div class='meta'>" + html.escape("; ".join(f"{t}: steps {', '.join(map(str, s))}" for t, s in trajs.items()))
             + f" &middot; common drift layer {html.escape(json.dumps(common))} &middot; measured in "
             + f"{sum(r['seconds']['total'] for r in table if not r.get('same_weights_as')):.0f} s over the anchors "
             + f"(this run {meta['seconds']:.0f} s)"
             + f" &middot; {meta['loading']['adapter_swaps']} adapter swaps, {meta['loading']['fresh_loads']} fresh loads</div>",
             "<h2>Findings of the paper's abstract (PROTOCOL 8), as found here</h2>", _findings(d["findings"]),
             "<p class='note'>The miniature is not expected to match the published figures numerically, only in "
             "direction. \"shown\" means the direction stated holds in these numbers, not that it is significant; see "
             "the correlation table for the p-values.</p>",
             "<h2>Against step</h2><div class='grid'>"]
    parts.append(_chart(table, "coupling |cos(H, R)|", "κ", {
        "mid band": lambda r: r["kappa_mid_band"], "at carrier": lambda r: r["kappa_at_carrier"],
        "κ_sub": lambda r: r["kappa_sub"]}, ylim=(0, 1)))
    methods = list(dict.fromkeys(m for r in table for m in ((r.get("fixed_source") or {}).get("per_method") or {})))
    asr = {"direct": lambda r: _val(r, "direct_asr"), "fixed-source": lambda r: _val(r, "fixed_source_asr")}
    if len(methods) > 1:  # each method of the replayed store beside the overall fixed-source ASR
        asr.update({f"fixed-source {m}": (lambda r, m=m: (((r.get("fixed_source") or {}).get("per_method") or {})
                                                         .get(m) or {}).get("asr")) for m in methods})
    ad_methods = list(dict.fromkeys(m for r in table for m in (r.get("adaptive") or {})))
    for m in ad_methods:
        asr[f"adaptive {m}"] = lambda r, m=m: ((r.get("adaptive") or {}).get(m) or {}).get("asr")
    parts.append(_chart(table, "attack success rate" + ("" if ad_methods else " (adaptive attacks: not run)"), "ASR",
                        asr, ylim=(0, 1)))
    parts.append(_chart(table, "XSTest any-refusal and benign utility", "share", {
        "XSTest any-refusal": lambda r: _val(r, "xstest_any_refusal"),
        "benign answered": lambda r: _val(r, "benign_utility")}, ylim=(0, 1)))
    parts.append(_chart(table, "carrier layer (relocation)", "layer", {
        "": lambda r: r["carrier"]["reference_layer"]}))
    parts.append(_chart(table, "refusal-subspace drift vs first anchor (°)", "mean principal angle", {
        "common layer": lambda r: (r.get("drift_first") or {}).get("common_deg", 0.0 if r.get("drift_first") is None else None),
        "own carrier": lambda r: (r.get("drift_first") or {}).get("own_deg", 0.0 if r.get("drift_first") is None else None)},
        ylim=(0, 90)))
    parts.append(_chart(table, "consecutive drift (°) and behaviour distance", "", {
        "drift vs previous": lambda r: (r.get("drift_prev") or {}).get("common_deg"),
        "‖b − b_first‖ × 90": lambda r: None if r.get("b_distance_first") is None else 90 * r["b_distance_first"]}))
    parts.append(_chart(table, "effective rank (reference ≈ 1.24)", "erank", {"": lambda r: r["effective_rank"]}))
    parts.append("</div>")
    parts.append(f"<p class='note'>Coupling: same-layer |cos(H, R)| averaged over the mid band, at each anchor's carrier, and "
                 f"κ_sub (k-dimensional). Carrier layer: the selected admissible carrier's layer, or the reference candidate's "
                 f"where none was admissible (the table says which). Drift: mean principal angle between the refusal "
                 f"subspaces Q_R of an anchor and of its trajectory's first anchor, at the common layer {html.escape(json.dumps(common))} "
                 f"and at each anchor's own carrier, so that drift is not confused with relocation. b(t) = "
                 f"(fixed-source ASR, useful answers per harmful prompt, XSTest any-refusal, benign answered).</p>")
    if d.get("transfer"):
        parts.append(_transfer(d["transfer"]))
    parts.append("<h2>All-anchor diagnostics: correlations</h2>")
    parts.append(_correlation_table(d["correlations"], meta))
    parts.append("<h2>Every anchor</h2>")
    parts.append(_anchor_table(table))
    parts.append("<p class='note'>Rates: value (k/n; 95% Wilson interval); greedy decoding, substring judge for attack "
                 "success and benign answers, the XSTest judge for any-refusal. Harmful usefulness without a model judge is "
                 "the length/specificity heuristic.</p>")
    parts.append("<h2>Run</h2><pre class='note'>" + html.escape(json.dumps(
        {"config": meta["config"], "sets": meta["sets"], "cases": meta["cases"], "n_test_cases": meta["n_test_cases"],
         "drift_reference": meta["drift_reference"], "log": meta["log"]}, indent=1)) + "</pre>")
    return _page(title, "\n".join(parts))


def _md_rate(r: dict | None) -> str:
    if not r:
        return "n/a"
    v = r.get("value", r.get("asr"))
    return "n/a" if v is None or v != v else f"{r['k']}/{r['n']}"


def trajectory_markdown(d: dict) -> str:
    """The anchor table and the correlation table of a trajectory result (``trajectory.json``) as Markdown."""
    table, corr = d["table"], d["correlations"]
    lines = ["| trajectory | step | carrier | admissible | κ mid | κ carrier | κ_sub | erank | direct ASR | fixed-source ASR "
             "| adaptive ASR | XSTest any-refusal | benign answered | drift vs first, common / own (°) | 1 − \\|cos R\\| "
             "| ‖b − b_first‖ |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in table:
        c, df = r["carrier"], r.get("drift_first") or {}
        ad = r.get("adaptive") or {}
        lines.append("| " + " | ".join([
            r["trajectory"], str(r["step"]), _where(c), str(c["n_admissible"]), _f(r["kappa_mid_band"]),
            _f(r["kappa_at_carrier"]), _f(r["kappa_sub"]), _f(r["effective_rank"], 2), _md_rate(r["direct_asr"]),
            _md_rate((r.get("fixed_source") or {}).get("overall")),
            ", ".join(f"{m} {v['k']}/{v['n']}" for m, v in ad.items()) or "—",
            _md_rate(r["xstest_any_refusal"]), _md_rate(r["benign_utility"]),
            _drift_cell(df, "—"), _f(df.get("R_direction_drift")) if df else "—", _f(r.get("b_distance_first"))]) + " |")
    groups = list(corr)
    out = ["\n".join(lines), "",
           "Spearman ρ (n) and two-sided permutation p (exact for n <= 10), pooled and per trajectory:", "",
           "| geometry | behaviour | " + " | ".join(f"{g}: ρ (n) | p" for g in groups) + " |",
           "|---|---|" + "---:|---:|" * len(groups)]
    for gk, bk, cells in _correlation_rows(corr)[0]:
        row = [x for c in cells for x in ("n/a" if c["rho"] is None else f"{c['rho']:+.2f} ({c['n']})",
                                          _p(c["p_two_sided"]))]
        out.append(f"| {gk} | {bk} | " + " | ".join(row) + " |")
    return "\n".join(out) + "\n"
