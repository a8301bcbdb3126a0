"""Shared by the tests/test_validate_*.py files: the assertion every bad input must pass, and tiny models."""

from __future__ import annotations

import functools

import pytest
import torch

from pysafegeom.errors import PysafegeomError

BUILTIN = (ValueError, TypeError, FileNotFoundError, FileExistsError)


def assert_clear(fn, exc: type, *names: str):
    """``fn()`` raises ``exc`` (a pysafegeom type that also subclasses a built-in) whose message names each of
    ``names``; returns the message."""
    with pytest.raises(exc) as info:
        fn()
    e = info.value
    assert isinstance(e, PysafegeomError), f"{type(e).__name__} is not a PysafegeomError: {e}"
    assert isinstance(e, BUILTIN), f"{type(e).__name__} subclasses none of the built-in error types"
    msg = str(e)
    for n in names:
        assert n in msg, f"{n!r} is not named in the message: {msg!r}"
    return msg


def enter(ctx):
    """Enter and leave a context manager (the interventions check their arguments on entry)."""
    with ctx:
        pass


@functools.lru_cache(maxsize=None)
def tiny_llama(tok, n_layers: int = 2, d_model: int = 32):
    from pysafegeom.models import tiny_model

    torch.set_num_threads(1)
    return tiny_model("llama", tokenizer=tok, n_layers=n_layers, d_model=d_model, seed=0)


@functools.lru_cache(maxsize=None)
def small_vocab_llama(vocab: int = 100):
    """A tiny model whose embedding has far fewer rows than any real tokenizer's vocabulary."""
    from pysafegeom.models import tiny_model

    return tiny_model("llama", n_layers=1, d_model=32, vocab_size=vocab, seed=0)
