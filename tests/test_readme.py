"""The README's Python examples, run as written on a tiny random model, so they cannot rot.

Every ```python block of README.md runs in one namespace, in order, with ``load_model`` (and so every
``analyze("name")``) answering with a tiny random Llama on the real SmolLM2 tokenizer, in a temporary
working folder. A block that raises fails the test and names the block.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_has_python_examples():
    assert len(_blocks()) >= 3


def test_readme_python_examples_run(tok, tmp_path, monkeypatch):
    import pysafegeom
    import pysafegeom.models as models
    import pysafegeom.models.loading as loading
    from pysafegeom.models import tiny_model

    model = tiny_model("llama", tokenizer=tok, n_layers=3, d_model=32, seed=2)
    seen = []

    def fake_load_model(spec="smollm2-135m-instruct", dtype=None, device=None):
        seen.append(str(spec))
        return model, tok

    monkeypatch.setattr(loading, "load_model", fake_load_model)
    monkeypatch.setattr(models, "load_model", fake_load_model)
    monkeypatch.chdir(tmp_path)
    # the README calls analyze() with its defaults; keep the tiny run small where the defaults are sized for real models
    real_analyze = pysafegeom.pipelines.analyze.analyze if hasattr(pysafegeom, "pipelines") else None
    import pysafegeom.pipelines.analyze as A

    real_analyze = A.analyze

    def small_analyze(*a, **k):
        k.setdefault("n_controls", 2)
        k.setdefault("n_behaviour", 4)
        k.setdefault("max_new_tokens", 8)
        k.setdefault("progress", False)
        return real_analyze(*a, **k)

    monkeypatch.setattr(A, "analyze", small_analyze)
    ns: dict = {}
    for i, code in enumerate(_blocks()):
        try:
            exec(compile(code, f"README.md python block {i + 1}", "exec"), ns)
        except Exception as exc:  # noqa: BLE001 - name the block that broke
            pytest.fail(f"README python block {i + 1} raised {type(exc).__name__}: {exc}\n{code}")
    assert "smollm2-135m-instruct" in seen and "smollm2-135m-safety" in seen
    assert callable(ns["generate"]) and isinstance(ns["answers"], list)
    assert (tmp_path / "results" / "smollm2" / "result.json").is_file()
    assert (tmp_path / "models" / "smollm2-abliterated" / "config.json").is_file()
    assert ns["res"].reopen is not None and "verdict" in ns["res"].reopen
