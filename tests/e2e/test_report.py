"""The report: a demo experiment's final stage ends with report.html and its figures; optuna.db; TensorBoard images."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

import search.report
from search.figures.explain import grad_cam
from search.tuning.study import TRIAL_ATTR, load_study
from tests.helpers import as_command, read_table
from trainables.data import make_demo
from trainables.weights import load_weights

report_main = as_command(search.report.main)

SEARCH_FIGURES = {"anytime", "learning_curves", "pareto", "importance", "objective_vs_top_params",
                  "parallel_coordinates"}
FINAL_FIGURES = {"confusion_matrix", "misclassified", "reliability", "kernels", "activations"}
MODEL_FIGURES = {"gradcam_examples", "gradcam_mean", "embedding", "top_activating"}
SECTIONS = ["search", "trials", "final", "labels", "gradcam", "features", "settings"]


@pytest.fixture(scope="module")
def report_exp(demo_final):
    """The shared 6-trial demo search, copied (as from a cluster), then its final stage (1 configuration x 2 seeds),
    which ends by writing the report (tests/conftest.py). (The search's own report at its end: the quick-start
    and storage tests.)"""
    return demo_final


@pytest.mark.slow
def test_the_final_stage_ends_with_the_report_and_every_figure(report_exp):
    exp, r = report_exp
    assert f"report: {exp / 'report.html'}" in r.stdout and "not written" not in r.stderr
    names = {p.stem for p in (exp / "figures").glob("*.png")}
    assert names == SEARCH_FIGURES | FINAL_FIGURES | MODEL_FIGURES
    page = (exp / "report.html").read_text()
    assert "http://" not in page and "https://" not in page and "<script" not in page  # opens offline
    assert page.count('src="data:image/png;base64,') == len(names)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SEARCH_FIGURES | FINAL_FIGURES | MODEL_FIGURES))
def test_every_figure_is_a_png_that_is_not_blank(report_exp, name):
    path = report_exp[0] / "figures" / f"{name}.png"
    with Image.open(path) as im:
        im.verify()  # a complete, valid PNG
    pixels = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    # Not blank: a plot fills a real share of the canvas with more than a couple of shades.
    assert pixels.std() > 10 and len(np.unique(pixels)) > 30 and (pixels < 200).mean() > 0.02


@pytest.mark.slow
def test_gradcam_maps_have_the_input_size_and_are_not_constant(report_exp):
    model, _ = load_weights(next((report_exp[0] / "final" / "models").glob("*.pt")))
    x = make_demo(splits=("PublicTest",), n_val=70).val.x[:16]
    maps = grad_cam(model, x, torch.arange(16) % 7)
    assert maps.shape == (16, 48, 48) and np.isfinite(maps).all()
    assert maps.min() >= 0 and maps.max() <= 1 + 1e-6
    varied = [m.std() > 1e-3 for m in maps]
    assert sum(varied) >= 12, [float(m.std()) for m in maps]  # a class the image gives no evidence for may be 0


@pytest.mark.slow
def test_the_report_opens_in_a_real_browser(report_exp):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (see .ci/run)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("no chromium on this machine (.ci/run installs Debian's package)")
    exp = report_exp[0]
    errors = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("requestfailed", lambda req: errors.append(f"failed request {req.url}"))
            page.goto((exp / "report.html").as_uri(), wait_until="load")
            sections = [s.get_attribute("id") for s in page.query_selector_all("section")]
            images = page.evaluate("Array.from(document.images).map(i => [i.alt, i.complete && i.naturalWidth])")
            text = page.inner_text("body")
        finally:
            browser.close()
    assert errors == []
    assert sections == SECTIONS
    assert len(images) == 15 and all(width and width > 100 for _, width in images), images
    assert "Where the model looks" in text and "fANOVA" in text


@pytest.mark.slow
def test_the_study_in_optuna_db_has_one_trial_per_trials_csv_row(report_exp):
    exp = report_exp[0]
    df = read_table(exp / "trials.csv")
    study = load_study(exp)
    by_id = {t.user_attrs[TRIAL_ATTR]: t for t in study.trials if TRIAL_ATTR in t.user_attrs}
    assert sorted(by_id) == sorted(df["trial_id"])
    for row in df.itertuples():
        t = by_id[row.trial_id]
        assert t.state.name == "COMPLETE" and t.value == pytest.approx(row.objective)
        for key, value in t.params.items():  # the params Optuna drew are the config the trial ran
            ran = df.loc[row.Index, f"config/{key}"]
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                assert float(ran) == pytest.approx(value), (key, value, ran)
            else:
                assert str(ran) == str(value), (key, value, ran)
        assert max(t.intermediate_values) == row.epochs  # every epoch was reported, the last one included


@pytest.mark.slow
def test_the_figures_are_in_tensorboard(report_exp):
    exp = report_exp[0]
    tags = set()
    for f in (exp / "tensorboard" / "report").glob("events.out.tfevents.*"):
        for ev in EventFileLoader(str(f)).Load():
            tags.update(v.tag for v in ev.summary.value if v.metadata.plugin_data.plugin_name == "images")
    assert {t.split("/")[-1] for t in tags} == SEARCH_FIGURES | FINAL_FIGURES | MODEL_FIGURES


@pytest.mark.slow
def test_report_of_an_interrupted_experiment_copied_elsewhere(report_exp, tmp_path, capsys):
    """No final stage, no optuna.db (an experiment from before it existed), data no longer at its path."""
    copy = tmp_path / "copied"
    shutil.copytree(report_exp[0], copy, ignore=shutil.ignore_patterns("final", "optuna.db", "figures", "report.html",
                                                                         "tensorboard"))
    settings = json.loads((copy / "settings.json").read_text())
    (copy / "settings.json").write_text(json.dumps({**settings, "data": str(tmp_path / "gone.csv")}))
    assert report_main([str(copy)]) == 0
    page = (copy / "report.html").read_text()
    assert "No final stage yet" in page and "rebuilt from trials.csv" in page
    assert {p.stem for p in (copy / "figures").glob("*.png")} == SEARCH_FIGURES
    assert all(f'id="{s}"' in page for s in SECTIONS)


@pytest.mark.parametrize("args, needle", [(["/nonexistent/exp"], "is not an experiment folder"),
                                          (["/tmp", "--colour", "x"], "unrecognized arguments")])
def test_bad_report_input_is_one_line_exit_2(args, needle, capsys):
    status = report_main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
