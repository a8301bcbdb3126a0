import json, sys, time
import pysafegeom
from pysafegeom.data import load_refusal_direction
D = "/work/shared/data/refusal_direction/splits/"
hf = [p.text for p in load_refusal_direction(D + "harmful_train.json")][:160]
hl = [p.text for p in load_refusal_direction(D + "harmless_train.json")][:160]
for spec in sys.argv[1:]:
    t = time.time()
    r = pysafegeom.analyze(spec, hf, hl, progress=False, selection_layer_stride=3)
    s = r.selection
    print(json.dumps({"spec": spec, "outcome": s.outcome, "layer": s.layer, "n_admissible": s.n_admissible,
                      "ref": r.metrics["reference"]["layer"], "kappa_mid": round(r.metrics["coupling"]["mid_band_mean"], 3),
                      "erank": round(r.metrics["effective_rank"], 2), "splits": {k: v.get("n") if isinstance(v, dict) else None for k, v in r.meta["splits"].items()} if isinstance(r.meta["splits"], dict) else None,
                      "s": round(time.time() - t)}), flush=True)
