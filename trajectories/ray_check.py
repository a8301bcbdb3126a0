"""The Ray fan-out on the real model: two anchors of the miniature R2D2 run (steps 0 and 10, SmolLM2-135M) measured by
``pysafegeom.trajectory(..., ray=...)`` with the per-anchor setting of trajectories/run_trajectory.sh, compared field
by field with the rows the single-process ``make trajectory-report`` wrote into trajectories/runs/trajectory/.

Each task asks for 2 CPUs (the 2 torch threads the single-process run had), so on this 2-core machine the anchors run
one after another: the check is of equality, not speed.

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
    out = {"anchors": {}, "wall_seconds": wall, "ray": res.meta["ray"],
           "setting": "trajectories/run_trajectory.sh's (every 3rd layer, bundled sets, 48 / 64 new tokens)"}
    for r in res.table:
        one = json.loads((SINGLE / f"r2d2-{r['step']}" / "anchor.json").read_text())["row"]
        diff = [k for k in KEYS if json.dumps(r.get(k), sort_keys=True) != json.dumps(one.get(k), sort_keys=True)]
        out["anchors"][f"r2d2-{r['step']}"] = {"equal": not diff, "differs_in": diff,
                                                "seconds_ray": r["seconds"]["total"],
                                                "seconds_single_process": one["seconds"]["total"]}
    text = json.dumps(out, indent=1)
    print(text)
    (ROOT / "trajectories" / "analysis" / "ray_check.json").write_text(text + "\n")
    return 0 if all(a["equal"] for a in out["anchors"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
