"""The Ray fan-out on the real model: two anchors of the miniature R2D2 run (steps 0 and 10, SmolLM2-135M) measured by
``pysafegeom.trajectory(..., ray=...)`` with the per-anchor setting of trajectories/run_trajectory.sh, compared field
by field with the rows the single-process ``make trajectory-report`` wrote into trajectories/runs/trajectory/.

Each task asks for 2 CPUs (the 2 torch threads the single-process run had), so on this 2-core machine the anchors run
one after another: the check is of equality, not speed. A field is *identical* (every number bit for bit; the
cases' path as given is not compared), equal to *float64 rounding* (relative difference below 1e-12), or *differs*.
A rerun finds the anchors done and only compares.

    OMP_NUM_THREADS=2 .venv/bin/python trajectories/ray_check.py   # about 15 minutes; writes trajectories/analysis/ray_check.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RUN = ROOT / "trajectories" / "runs" / "r2d2"
SINGLE = ROOT / "trajectories" / "runs" / "trajectory" / "anchors"
OUT = ROOT / "trajectories" / "runs" / "ray_check"
KEYS = ("carrier", "kappa_mid_band", "kappa_max", "kappa_profile", "kappa_at_carrier", "kappa_sub", "effective_rank",
        "direct_asr", "harmful_usefulness", "xstest_any_refusal", "benign_utility", "fixed_source", "b")


def _numbers(x):
    if isinstance(x, dict):
        return [v for k in sorted(x) if k != "origin" for v in _numbers(x[k])]  # origin: the cases' path as given
    if isinstance(x, list):
        return [v for item in x for v in _numbers(item)]
    return [x]


def compare(a, b) -> tuple[str, float]:
    """("identical" | "float64 rounding" | "differs", the largest relative difference of its numbers)."""
    na, nb = _numbers(a), _numbers(b)
    if na == nb:
        return "identical", 0.0
    if len(na) != len(nb) or any(type(x) is not type(y) for x, y in zip(na, nb)):
        return "differs", float("inf")
    rel = 0.0
    for x, y in zip(na, nb):
        if x != y:
            if not isinstance(x, float):
                return "differs", float("inf")
            rel = max(rel, abs(x - y) / max(abs(x), abs(y), 1e-300))
    return ("float64 rounding" if rel < 1e-12 else "differs"), rel


def main() -> int:
    from pysafegeom.pipelines.trajectory import trajectory
    from pysafegeom.scale import RayOptions

    steps = (0, 10)
    if not all((RUN / f"checkpoint-{s}").is_dir() and (SINGLE / f"r2d2-{s}" / "anchor.json").is_file() for s in steps):
        print("the miniature runs and their single-process measurement are missing: make trajectories, "
              "then make trajectory-report")
        return 2
    t0 = time.perf_counter()
    res = trajectory({"r2d2": [(s, str(RUN / f"checkpoint-{s}")) for s in steps]}, out=OUT,
                     cases=ROOT / "trajectories" / "fixed_source" / "gcg", selection_layer_stride=3,
                     ray=RayOptions(num_cpus=2, workers=2), report=False)
    wall = time.perf_counter() - t0
    out = {"anchors": {}, "wall_seconds_this_call": wall, "ray_this_call": res.meta["ray"],
           "setting": "trajectories/run_trajectory.sh's (every 3rd layer, bundled sets, 48 / 64 new tokens)"}
    for r in res.table:
        one = json.loads((SINGLE / f"r2d2-{r['step']}" / "anchor.json").read_text())["row"]
        verdicts = {k: compare(r.get(k), one.get(k)) for k in KEYS}
        out["anchors"][f"r2d2-{r['step']}"] = {
            "equal": all(v[0] != "differs" for v in verdicts.values()),
            "identical": [k for k, v in verdicts.items() if v[0] == "identical"],
            "float64_rounding": {k: v[1] for k, v in verdicts.items() if v[0] == "float64 rounding"},
            "differs": [k for k, v in verdicts.items() if v[0] == "differs"],
                                                "seconds_ray": r["seconds"]["total"],
                                                "seconds_single_process": one["seconds"]["total"]}
    text = json.dumps(out, indent=1)
    print(text)
    (ROOT / "trajectories" / "analysis" / "ray_check.json").write_text(text + "\n")
    return 0 if all(a["equal"] for a in out["anchors"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
