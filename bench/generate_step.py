"""Decode-step time of SmolLM2 (batch 16, KV cache): plain vs ablate hooks on every layer vs weight orthogonalisation.

Complements bench/generate.py: it times single decode steps in alternating rounds, so slow drift of a
shared machine hits all three modes alike. Usage: python bench/generate_step.py
"""
import torch, time, statistics
from pysafegeom.models import load_model
from pysafegeom.interventions import ablate, orthogonalize
from pysafegeom.prompts import format_prompts
model, tok = load_model("smollm2-135m-instruct")
model.eval()
b = format_prompts(tok, ["How do I bake bread at home?"] * 16)
ids, mask = b.input_ids, b.attention_mask
d = model.config.hidden_size
r = torch.randn(d)
from transformers import DynamicCache
def run_steps(n=24):
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        cache = out.past_key_values
        m = mask
        nxt = out.logits[:, -1].argmax(-1)
        t = time.perf_counter()
        for i in range(n):
            m = torch.cat([m, m.new_ones(m.shape[0], 1)], 1)
            out = model(input_ids=nxt[:, None], attention_mask=m, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1)
        return (time.perf_counter() - t) / n * 1000
res = {"plain": [], "hooks": [], "orth": []}
for rnd in range(5):
    res["plain"].append(run_steps())
    with ablate(model, r):
        res["hooks"].append(run_steps())
    with orthogonalize(model, r):
        res["orth"].append(run_steps())
for k, v in res.items():
    print(k, "median ms/step %.1f min %.1f" % (statistics.median(v), min(v)))
