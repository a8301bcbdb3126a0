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


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma", "mistral", "qwen2"])
def test_shared_prefix_batches_give_the_full_rows_last_logits(tok, arch):
    """Template-formatted prompts (one shared prefix, rows of different lengths, batches of 3): the prefix run once
    and broadcast gives the full rows' last logits, plain and under an ablation hook on every position. Tolerance:
    against a float64 run of the full rows, the shared-prefix float32 error is at most a few times the plain float32
    error (STYLE.md)."""
    from pysafegeom.interventions import ablate
    from pysafegeom.models.forward import SharedPrefixBatches, common_prefix_length
    from pysafegeom.prompts import encode_prompts

    model = tiny_model(arch, tokenizer=tok, n_layers=2, d_model=32, seed=6)
    prompts = ["Hi", "Explain how a pin tumbler lock works", "Why is the sky blue on a clear day?", "Name a bird.",
               "Write two lines about rain and wind over the hills at night"]
    enc = encode_prompts(tok, prompts)
    P = common_prefix_length(enc.rows)
    assert P >= 2 and all(r[:P] == enc.rows[0][:P] for r in enc.rows) and len({len(r) for r in enc.rows}) > 2
    sp = SharedPrefixBatches(tok, enc, 3)
    assert sp.P == P and len(sp.batches) == 2
    ref64 = tiny_model(arch, tokenizer=tok, n_layers=2, d_model=32, seed=6).double()
    u = torch.nn.functional.normalize(torch.randn(32, generator=torch.Generator().manual_seed(2)), dim=0)
    full_b = encode_batches(tok, enc, batch_size=3)
    for hooked in (False, True):
        with torch.no_grad(), (ablate(model, u) if hooked else _nothing()), \
                (ablate(ref64, u.double()) if hooked else _nothing()):
            want = torch.cat([last_logits(ref64, encode_batches(tok, [p], batch_size=1)) for p in prompts])
            plain = last_logits(model, full_b)
            got = sp.last_logits(model)
        e_plain, e_got = (plain - want).abs().max().item(), (got - want).abs().max().item()
        assert e_got <= 4 * e_plain + 1e-6, (hooked, e_got, e_plain)
        assert got.argmax(-1).tolist() == want.argmax(-1).tolist()


def _nothing():
    import contextlib

    return contextlib.nullcontext()


def test_shared_prefix_falls_back_without_a_prefix(tok):
    from pysafegeom.models.forward import SharedPrefixBatches, common_prefix_length
    from pysafegeom.prompts import EncodedPrompts, encode_prompts

    model = tiny_model("llama", tokenizer=tok, n_layers=2, d_model=32, seed=1)
    assert common_prefix_length([[11, 12, 13], [40, 12, 13, 14]]) == 0
    assert common_prefix_length([[5, 6], [5, 6, 7]], min_prefix=1) == 1  # one token must stay after the prefix
    assert common_prefix_length([[5, 6], [5, 6, 7]]) == 0  # shorter than min_prefix
    assert common_prefix_length([[5, 6, 7, 8], [5, 6, 7, 9, 9]], keep=2) == 2
    enc = encode_prompts(tok, ["Hi", "Name a bird."])
    rows = [[11, 12, 13], [40, 12, 13, 14]]
    bare = EncodedPrompts(enc.split, rows, ["a", "b"])
    for e, mp in ((bare, 2), (enc, None)):  # no shared prefix / prefix sharing switched off
        sp = SharedPrefixBatches(tok, e, 2, min_prefix=mp)
        assert sp.P == 0
        with torch.no_grad():
            want = torch.cat([forward(model, torch.tensor([r]), last_only=True).logits[:, -1].double() for r in e.rows])
            torch.testing.assert_close(sp.last_logits(model), want, atol=1e-5, rtol=1e-4)
