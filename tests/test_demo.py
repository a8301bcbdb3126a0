"""The demo pipeline end to end on tiny models: two results, one side-by-side report, findings in words,
reuse of finished results, and resume of an interrupted one."""

from __future__ import annotations

import pytest

from pysafegeom.models import tiny_model


@pytest.fixture
def fake_models(tok, monkeypatch):
    import pysafegeom.models as models
    import pysafegeom.models.loading as loading

    made = {"base": tiny_model("llama", tokenizer=tok, n_layers=3, d_model=32, seed=1),
            "anchor": tiny_model("llama", tokenizer=tok, n_layers=3, d_model=32, seed=2)}
    calls = []

    def fake_load_model(spec="base", dtype=None, device=None):
        calls.append(spec)
        return made[spec], tok

    monkeypatch.setattr(loading, "load_model", fake_load_model)
    monkeypatch.setattr(models, "load_model", fake_load_model)
    return calls


OPTS = {"n_val": 4, "selection_layer_stride": 1, "interventions": True, "n_controls": 1, "max_new_tokens": 4,
        "n_behaviour": 3, "selection_positions": ["eoi-1"], "n_kl_controls": 2}


def test_demo_writes_both_results_and_a_report_and_reuses_them(fake_models, tmp_path):
    from pysafegeom.pipelines.demo import run_demo

    lines = []
    done = run_demo("base", "anchor", tmp_path / "demo", OPTS, progress=False, echo=lines.append)
    out = tmp_path / "demo"
    assert (out / "base" / "result.json").is_file() and (out / "anchor" / "result.json").is_file()
    html = (out / "report.html").read_text()
    assert "unaligned base vs aligned anchor" in html
    f = done["findings"]
    assert f[0].startswith("base: selected carrier") and f[1].startswith("anchor: selected carrier")
    assert "Arditi's fixed KL" in f[0] and "calibrated" in f[0]
    assert any(x.startswith("Finding 1") for x in f) and any(x.startswith("Finding 2") or "cannot be judged" in x for x in f)
    n_loads = len(fake_models)
    again = run_demo("base", "anchor", out, OPTS, progress=False, echo=lines.append)
    assert len(fake_models) == n_loads and sum("reusing the finished result" in x for x in lines) == 2
    assert again["findings"] == f


def test_interrupted_demo_resumes_the_model_it_was_on(fake_models, tmp_path, monkeypatch):
    import pysafegeom.pipelines.analyze as A
    from pysafegeom.pipelines.analyze import stages_folder
    from pysafegeom.pipelines.demo import run_demo

    real = A.select_carrier

    class Stop(Exception):
        pass

    def boom(*a, **k):
        raise Stop

    out = tmp_path / "demo"
    monkeypatch.setattr(A, "select_carrier", boom)
    with pytest.raises(Stop):
        run_demo("base", "anchor", out, OPTS, progress=False, echo=lambda s: None)
    assert (stages_folder(out / "base") / "capture.pt").is_file()
    monkeypatch.setattr(A, "select_carrier", real)
    done = run_demo("base", "anchor", out, OPTS, progress=False, echo=lambda s: None)
    assert any("resumed: stage(s) capture" in n for n in done["results"]["base"].meta["notes"])
    assert not stages_folder(out / "base").exists()
