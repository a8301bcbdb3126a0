"""Transfer matrices: replay every source's test cases on every target model and tabulate ASR(source -> target).

The source of a test case is its record's ``source_model`` (the model the attack was run against). Test
cases with no source model (``source_model == "none"``: direct requests, fixed templates) form a row of
their own, named by their method (``"direct"``, ``"template:<name>"``). :func:`transfer` writes into ``out``:

* ``replay/<target name>/``: one :func:`~pysafegeom.attacks.replay.replay` folder per target (so a killed
  transfer resumes target by target, batch by batch);
* ``matrix.json``: ``{"sources", "targets", "methods", "cells": {method or "all": {source: {target: rate}}}, ...}``
  with ``rate = {"asr", "k", "n", "ci_low", "ci_high"}`` (95% Wilson interval; ``n`` counts test cases);
* ``transfer.html``: one heat map per method and one over all methods (rows sources, columns targets,
  colour = ASR on a fixed 0..1 scale, text = ASR, interval and k/n), and the same numbers as a table.
"""

from __future__ import annotations

import gc
import html
import json
import os
import re
from pathlib import Path

from .. import _io
from .replay import CONTENT as REPLAY_CONTENT
from .replay import ReplayError, _run, as_stores, check_judges, fmt_rate, judges_need_target, rate

CONTENT = "transfer"
ALL = "all"


def source_row(record: dict) -> str:
    """The matrix row of a record: its ``source_model``, or its method when it has none (``"none"``)."""
    s = record.get("source_model")
    return record["method"] if s in (None, "", "none") else s


def _safe(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "target"
    return s[:80]


def _targets(models) -> list:
    """``[(name, model, tokenizer) or (name, spec)]`` from tuples and specs; names unique."""
    if isinstance(models, (str, os.PathLike, tuple)):
        models = [models]
    if not isinstance(models, (list, tuple)) or not models:
        raise ReplayError("models must be a non-empty list of (name, model, tokenizer) tuples or model specs "
                          "(folders, .gguf files, registered names)")
    out, seen = [], set()
    for i, m in enumerate(models):
        if isinstance(m, (str, os.PathLike)):
            name, entry = Path(str(m)).name or str(m), (None, m)
        elif isinstance(m, tuple) and len(m) == 3 and isinstance(m[0], str):
            name, entry = m[0], (m[1], m[2])
        else:
            raise ReplayError(f"models[{i}] is a {type(m).__name__}; give (name, model, tokenizer) or a model spec")
        if _safe(name) in seen:
            raise ReplayError(f"two targets are named {name!r}; name them apart with (name, model, tokenizer) tuples")
        seen.add(_safe(name))
        out.append((name, *entry))
    return out


def matrix(rows_by_target: dict[str, list[dict]]) -> dict:
    """``{"sources", "targets", "methods", "cells"}`` from each target's flat replay result rows."""
    targets = list(rows_by_target)
    sources, methods = {}, {}
    counts: dict = {}
    for t, rows in rows_by_target.items():
        for r in rows:
            s = source_row(r)
            sources.setdefault(s, None)
            methods.setdefault(r["method"], None)
            for m in (r["method"], ALL):
                c = counts.setdefault(m, {}).setdefault(s, {}).setdefault(t, [0, 0])
                c[0] += r["label"]
                c[1] += 1
    cells = {m: {s: {t: rate(*counts[m][s][t]) for t in targets if t in counts[m].get(s, {})}
                 for s in sources if s in counts[m]} for m in [*methods, ALL]}
    return {"sources": list(sources), "targets": targets, "methods": list(methods), "cells": cells}


def _transfer_ray(stores, targets, out: Path, ropts, judges, *, max_new_tokens, template, system, batch_size,
                  shard_size, resume, progress, device, dtype, placement) -> tuple[dict, dict]:
    """Every target's generation shards in one Ray pool, then each target judged (see :func:`transfer`)."""
    from ..scale import progress_bar, run_units, session
    from .replay import TARGET_FILE, _finish_ray, _Merger, _shard_task, shard_units

    needs_target = judges_need_target(judges)
    units, known, merge = [], {}, _Merger()
    for name, _, spec in targets:
        d = out / "replay" / _safe(name)
        d.mkdir(parents=True, exist_ok=True)
        _io.mark_dir(d, REPLAY_CONTENT)
        if not resume:
            for f in ("generations.json", TARGET_FILE):
                (d / f).unlink(missing_ok=True)
        u, known[name] = shard_units(stores, str(spec), d, key=_safe(name), max_new_tokens=max_new_tokens,
                                     template=template, system=system, batch_size=batch_size, shard_size=shard_size,
                                     device=device, dtype=dtype, placement=placement)
        units += u
        merge.add(_safe(name), d, str(spec))
    rows_by_target, summaries = {}, {}
    total = len(units) + (len(targets) if needs_target else 0)
    with session(ropts), progress_bar(total, "transfer: shards", progress) as bar:
        run_units(units, _shard_task, ropts, desc="transfer shards", on_done=merge, bar=bar)
        for name, _, spec in targets:
            summaries[name], rows_by_target[name] = _finish_ray(
                stores, str(spec), out / "replay" / _safe(name), merge.targets[_safe(name)], known[name], judges,
                needs_target, ropts, target_name=name, device=device, dtype=dtype, placement=placement,
                max_new_tokens=max_new_tokens, template=template, system=system, batch_size=batch_size, bar=bar)
    return rows_by_target, summaries


def transfer(cases, models, *, out, judges=None, max_new_tokens: int = 64, template: str | None = None,
             system: str | None = None, batch_size: int = 16, resume: bool = True, progress: bool = True,
             overwrite: bool = False, device=None, dtype=None, ray=None, shard_size: int | None = None,
             device_map=None, max_memory=None, offload_folder=None) -> dict:
    """Replay the test cases of every source in ``cases`` on every target in ``models``; returns the matrix.

    ``cases``: stores or paths (:func:`~pysafegeom.attacks.store.open_cases`), or one of them.
    ``models``: ``(name, model, tokenizer)`` tuples and/or specs for :func:`pysafegeom.models.load_model`
    (loaded one at a time with ``device``/``dtype``, and freed before the next). ``judges``: a list of judges
    (default ``[SubstringJudge()]``, the first decides), or a callable ``(model, tokenizer) -> list of judges``
    for judges that use the target itself. ``max_new_tokens``, ``template``, ``system``, ``batch_size``,
    ``resume``, ``progress``: as :func:`~pysafegeom.attacks.replay.replay`.

    ``ray``: fan out on Ray (``True``, an address or :class:`pysafegeom.scale.RayOptions`): one task per (target,
    shard of ``shard_size`` test cases), every target's shards in one pool, then each target judged as in a single
    process; the targets must then be specs. The folders and the matrix are those of a single-process run.
    ``device_map`` / ``max_memory`` / ``offload_folder``: every spec loaded placed over several devices (as
    :func:`pysafegeom.load_model`).

    Returns what ``matrix.json`` holds (module docstring), plus each target's replay summary under ``"replays"``.
    """
    from ..scale import ray_options

    ropts = ray_options(ray)
    from ..models.loading import placement_options

    placement = placement_options(device, device_map, max_memory, offload_folder, here=ropts is None)
    stores = as_stores(cases)  # errors before any model loads
    targets = _targets(models)
    if ropts is not None and any(model is not None for _, model, _ in targets):
        raise ReplayError("ray= needs every target as a load_model spec (each task loads its own copy), not a loaded "
                          "(name, model, tokenizer)")
    if not judges_need_target(judges):
        judges = check_judges(judges)
    out = _io.check_output_path(out, overwrite, "dir", content=CONTENT)
    for name, *_ in targets:
        _io.check_output_path(out / "replay" / _safe(name), overwrite, "dir", content=REPLAY_CONTENT)
    out.mkdir(parents=True, exist_ok=True)
    _io.mark_dir(out, CONTENT)
    rows_by_target, summaries = {}, {}
    if ropts is not None:
        rows_by_target, summaries = _transfer_ray(stores, targets, out, ropts, judges, max_new_tokens=max_new_tokens,
                                                  template=template, system=system, batch_size=batch_size,
                                                  shard_size=shard_size, resume=resume, progress=progress,
                                                  device=device, dtype=dtype, placement=placement)
    for name, model, tok in targets if ropts is None else []:
        loaded = model is None
        if loaded:
            from ..models import load_model

            model, tok = load_model(tok, dtype=dtype, device=device, **placement)
        try:
            js = judges(model, tok) if judges_need_target(judges) else judges
            summary, rows = _run(stores, model, tok, out=out / "replay" / _safe(name), judges=js,
                                 max_new_tokens=max_new_tokens, template=template, system=system,
                                 batch_size=batch_size, target_name=name, resume=resume, progress=progress,
                                 overwrite=overwrite)
        finally:
            if loaded:
                del model, tok
                gc.collect()
                try:
                    import torch

                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                except ImportError:  # pragma: no cover
                    pass
        rows_by_target[name] = rows
        summaries[name] = summary
    m = matrix(rows_by_target)
    first = next(iter(summaries.values()))
    m.update({"max_new_tokens": max_new_tokens, "template": template, "system": system,
              "judges": first["judges"], "primary_judge": first["primary_judge"],
              "target_hashes": {t: s["target"]["hash"] for t, s in summaries.items()},
              "case_sources": [s.origin for s in stores], "unit": "test case", "replays": summaries})
    _io.atomic_write_text(out / "matrix.json", json.dumps(_io.json_safe(m), indent=1, ensure_ascii=False) + "\n")
    _io.atomic_write_text(out / "transfer.html", render_html(m))
    return m


# ------------------------------------------------------------------------------------------ rendering

def matrix_text(m: dict, method: str = ALL) -> str:
    """One method's matrix as aligned text: a row per source, a column per target, ``ASR [lo, hi] (k/n)``."""
    cells = m["cells"].get(method, {})
    rows = [s for s in m["sources"] if s in cells]
    head = ["source \\ target", *m["targets"]]
    table = [[s, *[fmt_rate(cells[s].get(t)) for t in m["targets"]]] for s in rows]
    widths = [max(len(str(r[i])) for r in [head, *table]) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in [head, *table])


def _colour(v) -> str:
    if v is None:
        return "#ddd"
    # white (0) to red (1)
    return f"rgb(255,{int(255 - 200 * v)},{int(255 - 215 * v)})"


def heatmap_svg(m: dict, method: str) -> str:
    """An SVG grid for one method: rows sources, columns targets, fill = ASR (white 0 to red 1), text = ASR,
    95% interval and k/n; grey where the pair has no test cases."""
    cells = m["cells"].get(method, {})
    rows = [s for s in m["sources"] if s in cells]
    cols = m["targets"]
    cw, ch, ml, mt = 150, 46, max(90, 7 * max((len(r) for r in rows), default=8) + 12), 52
    width, height = ml + cw * len(cols) + 10, mt + ch * len(rows) + 10
    title = "all methods" if method == ALL else method
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="11"><text x="{width / 2}" y="16" text-anchor="middle" font-size="13" font-weight="bold">'
             f'ASR, {html.escape(title)} (source &#8594; target)</text>']
    for j, t in enumerate(cols):
        parts.append(f'<text x="{ml + j * cw + cw / 2}" y="{mt - 8}" text-anchor="middle">{html.escape(t)}</text>')
    for i, s in enumerate(rows):
        y = mt + i * ch
        parts.append(f'<text x="{ml - 6}" y="{y + ch / 2 + 4}" text-anchor="end">{html.escape(s)}</text>')
        for j, t in enumerate(cols):
            r = cells[s].get(t)
            x = ml + j * cw
            v = None if not r else r["asr"]
            parts.append(f'<rect x="{x}" y="{y}" width="{cw - 2}" height="{ch - 2}" fill="{_colour(v)}" stroke="#999">'
                         f'<title>{html.escape(s)} &#8594; {html.escape(t)}: {html.escape(fmt_rate(r))}</title></rect>')
            if v is not None:
                parts.append(f'<text x="{x + cw / 2}" y="{y + 18}" text-anchor="middle" font-weight="bold">{v:.2f}</text>'
                             f'<text x="{x + cw / 2}" y="{y + 34}" text-anchor="middle">[{r["ci_low"]:.2f}, '
                             f'{r["ci_high"]:.2f}] {r["k"]}/{r["n"]}</text>')
            else:
                parts.append(f'<text x="{x + cw / 2}" y="{y + 26}" text-anchor="middle" fill="#666">n/a</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def render_html(m: dict) -> str:
    """The transfer report: a heat map per method and over all methods, and a table of every cell."""
    from ..report import _page

    meta = (f"{len(m['sources'])} sources, {len(m['targets'])} targets; judge {html.escape(str(m.get('primary_judge')))} "
            f"decides (also reported: {html.escape(', '.join(m.get('judges', [])[1:]) or 'none')}); greedy, "
            f"max_new_tokens={m.get('max_new_tokens')}; ASR counts test cases, intervals are 95% Wilson.")
    body = ["<h1>pysafegeom: attack transfer</h1>", f"<p class='meta'>{meta}</p>",
            "<p class='note'>Rows are the models the test cases were made against (direct requests and fixed "
            "templates, which have none, are rows of their own); columns are the models they were replayed on.</p>",
            "<h2>All methods</h2>", heatmap_svg(m, ALL), "<h2>Per method</h2>", "<div class='grid'>"]
    body += [heatmap_svg(m, meth) for meth in m["methods"]]
    body.append("</div><h2>Table</h2><table><tr><th>method</th><th>source</th><th>target</th><th>ASR</th>"
                "<th>95% interval</th><th>k/n</th></tr>")
    for meth in [*m["methods"], ALL]:
        for s, row in m["cells"].get(meth, {}).items():
            for t, r in row.items():
                body.append(f"<tr><td>{html.escape(meth)}</td><td>{html.escape(s)}</td><td>{html.escape(t)}</td>"
                            f"<td>{r['asr']:.2f}</td><td>[{r['ci_low']:.2f}, {r['ci_high']:.2f}]</td>"
                            f"<td>{r['k']}/{r['n']}</td></tr>")
    body.append("</table>")
    return _page("pysafegeom: attack transfer", "\n".join(body))


__all__ = ["heatmap_svg", "matrix", "matrix_text", "render_html", "source_row", "transfer"]
