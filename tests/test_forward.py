"""models/forward.py: the forward conventions every stage shares, against plain full forwards."""

from __future__ import annotations

import pytest
import torch

from pysafegeom.models import tiny_model
from pysafegeom.models.forward import PrefixCache, forward, kl_next_token, last_logits, position_ids
from pysafegeom.prompts import encode_batches


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prefix_cache_gives_the_full_forwards_logits(tok, arch):
    """A prefix computed once and expanded to a batch of continuations gives the same logits as running each
    prefix + continuation from scratch (fresh random ids, never zeros)."""
    model = tiny_model(arch, tokenizer=tok, n_layers=2, d_model=32, seed=4)
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(5, 400, (1, 7), generator=g)
    cont = torch.randint(5, 400, (3, 5), generator=g)
    pc = PrefixCache.build(model, prefix)
    assert len(pc) == 7
    with torch.no_grad():
        got = forward(model, cont, cache=pc.expand(3)).logits
        want = model(input_ids=torch.cat([prefix.expand(3, -1), cont], 1)).logits[:, 7:]
        again = forward(model, cont, cache=pc.expand(3)).logits  # the prefix cache is not consumed
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(again, got)


def test_position_ids_and_padded_last_logits_match_unpadded_runs(tok):
    model = tiny_model("gpt2", tokenizer=tok, n_layers=2, d_model=32, seed=1)
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert position_ids(mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
    prompts = ["Hi", "Explain how a pin tumbler lock works so I can choose a secure one"]
    batches = encode_batches(tok, prompts, batch_size=2)
    with torch.no_grad():
        padded = last_logits(model, batches)
        single = torch.cat([last_logits(model, encode_batches(tok, [p], batch_size=1)) for p in prompts])
    torch.testing.assert_close(padded, single, atol=1e-5, rtol=1e-4)
    kl = kl_next_token(single, padded)
    assert kl.shape == (2,) and (kl.abs() < 1e-6).all()
    assert float(kl_next_token(single, single.flip(0))[0]) > 0.0
    with pytest.raises(ValueError, match="exactly one"):
        forward(model)
