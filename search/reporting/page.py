"""The report page: every figure of an experiment drawn into `<experiment>/figures/`, and one self-contained
report.html.

Reads top to bottom: the experiment's settings, its trials, the search's pictures
(`search.reporting.search_figures`), the final stage's tables and pictures, and the final model seen
from inside (`search.reporting.model_figures`); each figure is written to `results/<name>/figures/`
and embedded in `results/<name>/report.html` (base64 images, inline CSS, no script and
nothing fetched, so it opens anywhere, offline). The same figures are logged as images to
`results/<name>/tensorboard/report/`. Everything comes from the experiment folder (plus
its data's PublicTest for the model figures), so it works on a folder copied back from a
cluster and on an interrupted experiment: a section without data says why. `search.run`
and `search.final` write it when they end.
"""
from __future__ import annotations

import base64
import dataclasses
import html
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

from search.final_stage.retrain import run_name
from search.reporting import search_figures as sp
from search.reporting.model_figures import MODEL_FIGURES, ModelView, analysed_model, load_public_test
from search.tuning.settings import Settings, read_settings
from search.tuning.study import STUDY_FILE
from trainables.files import write_text

FIGURES_DIR = "figures"
REPORT_FILE = "report.html"
TENSORBOARD_DIR = Path("tensorboard") / "report"
TRIALS_SHOWN = 100
# The final stage's own pictures (search.final_stage.analysis), copied beside the report's.
FINAL_FIGURES = {
    "confusion_matrix.png": "PrivateTest confusion matrix of the analysed model, per test-time augmentation "
                            "(colour: share of the true class).",
    "misclassified.png": "Its most confident PrivateTest mistakes (row, true -> predicted, confidence).",
    "reliability.png": "Reliability of the analysed model's PrivateTest probabilities before and after temperature "
                       "scaling (T fitted on PublicTest): accuracy against confidence per bin; the diagonal is "
                       "perfect calibration.",
    "kernels.png": "First-layer kernels of the best single run (red positive, blue negative weights).",
    "activations.png": "Per emotion its mean PublicTest face, and where the deepest convolution with a spatial grid "
                       "fires more (red) or less (blue) than on the average emotion.",
}


@dataclass
class Section:
    """One part of the report: an id (the HTML anchor), a title, and its blocks in order."""

    id: str
    title: str
    blocks: list[tuple[str, object, str]] = field(default_factory=list)  # (kind, content, caption)

    def note(self, text: str) -> None:
        self.blocks.append(("note", text, ""))

    def table(self, df: pd.DataFrame, caption: str = "") -> None:
        self.blocks.append(("table", df, caption))

    def figure(self, path: Path, caption: str) -> None:
        self.blocks.append(("figure", path, caption))


# --------------------------------------------------------------------------- sections

def settings_section(s: Settings, exp: Path) -> Section:
    sec = Section("settings", "Settings")
    values = dataclasses.asdict(s)
    sec.table(pd.DataFrame({"setting": list(values), "value": [str(v) for v in values.values()]}))
    split = exp / "time_budget.json"
    if split.is_file():
        sec.table(pd.json_normalize(json.loads(split.read_text())),
                  "How --time-budget was split (seconds; the final stage as far as the start of this report).")
    return sec


def read_trials(exp: Path) -> pd.DataFrame:
    path = exp / "trials.csv"
    if not path.is_file() or path.stat().st_size == 0:
        return pd.DataFrame(columns=["trial_id", "status", "objective"])
    return pd.read_csv(path, dtype={"trial_id": str})


def trials_section(trials: pd.DataFrame) -> Section:
    sec = Section("trials", "Trials")
    if trials.empty:
        sec.note("No trial has finished yet (trials.csv is written as trials end).")
        return sec
    counts = ", ".join(f"{n} {status}" for status, n in trials["status"].value_counts().items())
    cols = [c for c in ("trial_id", "status", "objective", "epochs", "seconds") if c in trials.columns]
    cols += [c for c in trials.columns if c.startswith("config/")]
    shown = trials[cols].head(TRIALS_SHOWN).rename(columns=lambda c: c.removeprefix("config/"))
    more = f"; the best {TRIALS_SHOWN} are shown, trials.csv has all" if len(trials) > TRIALS_SHOWN else ""
    sec.table(shown, f"{len(trials)} trials ({counts}), best objective first{more}.")
    return sec


def _draw(sec: Section, figures: Path, name: str, draw: Callable[[Path], str]) -> None:
    """Draw one figure into the section, or say in the section why it cannot be drawn."""
    try:
        caption = draw(figures / name)
    except sp.NoData as why:
        sec.note(f"{name}: {why}")
        return
    sec.figure(figures / name, caption)


def search_section(exp: Path, s: Settings, trials: pd.DataFrame, figures: Path) -> Section:
    sec = Section("search", "How the search went")
    try:
        history = sp.trial_histories(exp, s.storage)
    except sp.NoData as why:
        sec.note(str(why))
        history = pd.DataFrame(columns=["trial_id", *sp.HISTORY_KEYS])
    _draw(sec, figures, "anytime.png", lambda p: sp.plot_anytime(history, p))
    _draw(sec, figures, "learning_curves.png", lambda p: sp.plot_learning_curves(history, trials, p))
    _draw(sec, figures, "pareto.png", lambda p: sp.plot_pareto(trials, exported_trials(exp), p, s.max_latency_ms))
    source = (f"the study in {STUDY_FILE} (optuna-dashboard sqlite:///{exp / STUDY_FILE} shows it live)"
              if (exp / STUDY_FILE).is_file() else "a study rebuilt from trials.csv (this experiment has no "
                                                   f"{STUDY_FILE})")
    study = sp.study_of(exp, s, trials, history)
    try:
        ranked = sp.importances(study)
    except sp.NoData as why:
        sec.note(f"Hyperparameter importance: {why}.")
        return sec
    sec.note(f"Importance, slices and parallel coordinates come from {source}.")
    table = pd.DataFrame({"hyperparameter": list(ranked),
                          "importance (fANOVA), final objective": [round(float(v), 3) for v in ranked.values()]})
    if s.scheduler == "asha":
        try:
            rung = sp.importances(sp.at_epoch(study, s.grace_epochs))
            table[f"at epoch {s.grace_epochs}, every trial equally trained"] = [
                round(float(rung[k]), 3) if k in rung else None for k in ranked]
        except sp.NoData:
            pass
    sec.table(table, "The share of the objective's variance each hyperparameter explains. Under ASHA a stopped "
                     "trial's final objective comes from fewer epochs, so the last column, at the first rung, "
                     "separates the hyperparameters from how long ASHA let a trial run.")
    _draw(sec, figures, "importance.png", lambda p: sp.plot_importance(study, ranked, p))
    _draw(sec, figures, "objective_vs_top_params.png", lambda p: sp.plot_top_params(study, ranked, p))
    _draw(sec, figures, "parallel_coordinates.png", lambda p: sp.plot_parallel(study, ranked, p))
    return sec


def exported_trials(exp: Path) -> dict[str, str]:
    """The trials whose configurations the final stage exported (trial id -> which files), from metrics.csv:
    best_single (the run with the best PublicTest accuracy), best_ensemble's members, best_distilled."""
    metrics = exp / "final" / "metrics.csv"
    if not metrics.is_file():
        return {}
    m = pd.read_csv(metrics, dtype={"trial_id": str})
    m = m[m["tta"] == "none"]
    runs = m[m["kind"] == "run"]
    labels: dict[str, list[str]] = {}
    if len(runs):
        labels.setdefault(str(_chosen(runs)["trial_id"]), []).append("best_single")
        by_name = {run_name(c, int(k)): str(t) for c, k, t in zip(runs["config"], runs["seed"], runs["trial_id"])}
        ens = m[m["kind"].str.startswith("ensemble")]
        if len(ens):
            for member in str(_chosen(ens)["config"]).split("+"):
                if member in by_name and "best_ensemble" not in labels.get(by_name[member], []):
                    labels.setdefault(by_name[member], []).append("best_ensemble")
    for t in m[m["kind"] == "distilled"]["trial_id"]:
        labels.setdefault(str(t), []).append("best_distilled")
    return {t: ", ".join(names) for t, names in labels.items()}


def final_section(exp: Path, figures: Path) -> Section:
    final = exp / "final"
    sec = Section("final", "Final stage (PrivateTest)")
    metrics = final / "metrics.csv"
    if not metrics.is_file():
        sec.note(f"No final stage yet: python -m search.final {exp} retrains the best configurations and "
                 f"evaluates them on PrivateTest.")
        return sec
    table = pd.read_csv(metrics)
    cols = [c for c in ("kind", "config", "seed", "tta", "val_acc", "accuracy", "accuracy_dedup", "fbeta_macro",
                        "top2_accuracy", "ece", "ece_calibrated") if c in table.columns]
    sec.table(table[cols], "metrics.csv: every run, the mean and spread per configuration, the ensembles, the "
                           "distilled student (one network taught by the exported ensemble); "
                           "val_acc is PublicTest, accuracy PrivateTest; ece is the expected calibration error "
                           "before and after temperature scaling (fitted on PublicTest).")
    pairs = final / "confused_pairs.csv"
    if pairs.is_file():
        df = pd.read_csv(pairs)
        model = df["model"].iloc[0] if len(df) else ""
        per_class = pd.read_csv(final / "per_class.csv")
        sec.table(per_class[(per_class["model"] == model) & (per_class["tta"] == "none")],
                  f"Per emotion, {model} without test-time augmentation.")
        sec.table(df.head(10), "The most frequent confusions (true -> predicted).")
    for name, caption in FINAL_FIGURES.items():
        if (final / name).is_file():
            shutil.copyfile(final / name, figures / name)
            sec.figure(figures / name, caption)
    return sec


LABEL_COLUMNS = ("emotion", "n", "n_ferplus", "n_agreed", "label_agreement", "accuracy", "accuracy_ferplus",
                 "accuracy_agreed", "accuracy_either", "mistakes_ferplus", "ferplus_sides_model",
                 "ferplus_sides_label", "ferplus_sides_neither")


def labels_section(exp: Path, figures: Path) -> Section:
    """The label audit of the final stage (`search.final_stage.labels`): FER2013's labels read against FER+."""
    final = exp / "final"
    sec = Section("labels", "Labels against FER+")
    if not (final / "label_audit.csv").is_file():
        sec.note("No label audit: the final stage audits the labels when Microsoft's FER+ votes (fer2013new.csv) "
                 "are beside the FER2013 data or given with --ferplus.")
        return sec
    table = pd.read_csv(final / "label_audit.csv")
    model, every = table["model"].iloc[0], table.iloc[0]
    sec.note(f"Of {model}'s {every['mistakes']} PrivateTest mistakes, {every['mistakes_ferplus']} have a FER+ "
             f"majority among the 7 emotions; FER+ sides with the model on {every['ferplus_sides_model']:.0%} of "
             f"them, with the FER2013 label on {every['ferplus_sides_label']:.0%}, with neither on "
             f"{every['ferplus_sides_neither']:.0%}. Counting a prediction right when either label has it lifts "
             f"accuracy from {every['accuracy']:.1%} to {every['accuracy_either']:.1%}.")
    sec.table(table[[c for c in LABEL_COLUMNS if c in table.columns]],
              "label_audit.csv, over all images and per FER2013 label: accuracy against the FER2013 label, the FER+ "
              "majority (n_ferplus images: contempt, unknown, not-a-face and no majority left out) and on the "
              "agreed subset; of the mistakes FER+ can judge, the share where it sides with the model, the label or "
              "neither.")
    summary = final / "label_issues_summary.csv"
    if summary.is_file():
        sec.table(pd.read_csv(summary).drop(columns=["model", "tta"]),
                  "cleanlab's label issues (from the model's PrivateTest probabilities) against FER+: "
                  "precision_ferplus is the share of the flagged images whose FER+ majority differs from their "
                  "FER2013 label, against every image (base_rate) and every mistake of the model.")
    if (final / "label_audit.png").is_file():
        shutil.copyfile(final / "label_audit.png", figures / "label_audit.png")
        sec.figure(figures / "label_audit.png", "The most confident mistakes beside their FER+ votes: the FER2013 "
                                                "label in blue, the model's prediction in orange.")
    return sec


def model_sections(exp: Path, s: Settings, figures: Path, data: str | None) -> list[Section]:
    looks = Section("gradcam", "Where the model looks (Grad-CAM)")
    space = Section("features", "The feature space")
    try:
        model = analysed_model(exp / "final")
        view = ModelView.of(model, *load_public_test(s, data))
    except sp.NoData as why:
        for sec in (looks, space):
            sec.note(str(why))
        return [looks, space]
    for key, sec in (("gradcam", looks), ("embedding", space), ("top_activating", space)):
        try:
            captions = MODEL_FIGURES[key](figures, view)
        except sp.NoData as why:
            sec.note(str(why))
            continue
        for name, caption in captions.items():
            sec.figure(figures / name, caption)
    return [looks, space]


# --------------------------------------------------------------------------- output

_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
h1{margin-bottom:.2em}nav a{margin-right:1em}section{margin-top:2.5em}figure{margin:1.2em 0}
img{max-width:100%;border:1px solid #ddd}figcaption,.caption{color:#444;font-size:.92em;margin:.3em 0}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0;display:block;overflow-x:auto}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#f3f3f3}.note{color:#8a5300}"""


def _block_html(kind: str, content, caption: str) -> str:
    if kind == "note":
        return f'<p class="note">{html.escape(str(content))}</p>'
    if kind == "table":
        text = content.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="", border=0)
        return (f'<p class="caption">{html.escape(caption)}</p>' if caption else "") + text
    data = base64.b64encode(Path(content).read_bytes()).decode("ascii")
    return (f'<figure id="fig-{Path(content).stem}"><img alt="{html.escape(Path(content).name)}" '
            f'src="data:image/png;base64,{data}"><figcaption>{html.escape(caption)}</figcaption></figure>')


def _chosen(rows: pd.DataFrame) -> pd.Series:
    """The row with the best PublicTest accuracy (the first on a tie), as the final stage chooses what it exports."""
    return rows.loc[pd.to_numeric(rows["val_acc"]).idxmax()]


def summary(trials: pd.DataFrame, exp: Path) -> str:
    """One line at the top: how many trials, the best objective, the final stage's headline."""
    done = trials[pd.to_numeric(trials["objective"], errors="coerce").notna()] if not trials.empty else trials
    parts = [f"{len(trials)} trials"]
    if len(done):
        parts.append(f"best PublicTest accuracy in the search {float(done['objective'].max()):.1%}")
    metrics = exp / "final" / "metrics.csv"
    if metrics.is_file():
        m = pd.read_csv(metrics)
        runs = m[(m["kind"] == "run") & (m["tta"] == "none")]
        ens = m[m["kind"].str.startswith("ensemble") & (m["tta"] == "none")]
        if len(runs):
            # The figures of the models chosen on PublicTest (the exported ones), never the best on PrivateTest:
            # a headline that picked the maximum PrivateTest accuracy would choose on the test set.
            part = (f"PrivateTest accuracy of the run chosen on PublicTest {_chosen(runs)['accuracy']:.1%} "
                    f"(the final runs average {runs['accuracy'].mean():.1%})")
            if len(ens):
                part += f", of the ensemble chosen on PublicTest {_chosen(ens)['accuracy']:.1%}"
            student = m[(m["kind"] == "distilled") & (m["tta"] == "none")]
            if len(student):
                part += f", of the distilled student {student['accuracy'].iloc[0]:.1%}"
            parts.append(part + " (no test-time augmentation)")
    else:
        parts.append("no final stage yet")
    return "; ".join(parts) + "."


def render(s: Settings, sections: Sequence[Section], headline: str = "") -> str:
    """The report as one HTML document."""
    nav = " ".join(f'<a href="#{sec.id}">{html.escape(sec.title)}</a>' for sec in sections)
    body = "\n".join(f'<section id="{sec.id}"><h2>{html.escape(sec.title)}</h2>\n'
                     + "\n".join(_block_html(*b) for b in sec.blocks) + "</section>" for sec in sections)
    title = f"FER search report: {s.name}"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<link rel="icon" href="data:,"><style>{_CSS}</style></head><body>'
            f'<h1>{html.escape(title)}</h1><p>space {html.escape(s.space)}, data {html.escape(s.data)}, written '
            f'{time.strftime("%Y-%m-%d %H:%M")}</p><p><b>{html.escape(headline)}</b></p>'
            f'<nav>{nav}</nav>\n{body}\n</body></html>\n')


def log_to_tensorboard(exp: Path, sections: Sequence[Section]) -> None:
    """Every figure of the report as a TensorBoard image under tensorboard/report/ (replaced on each run)."""
    import numpy as np
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    folder = exp / TENSORBOARD_DIR
    shutil.rmtree(folder, ignore_errors=True)
    writer = SummaryWriter(str(folder))
    try:
        for sec in sections:
            for kind, path, caption in sec.blocks:
                if kind == "figure":
                    image = np.asarray(Image.open(path).convert("RGB"))
                    writer.add_image(f"{sec.id}/{Path(path).stem}", image, dataformats="HWC")
                    writer.add_text(f"{sec.id}/{Path(path).stem}", caption)
    finally:
        writer.close()


def write_report(exp: Path, *, data: str | None = None) -> Path:
    """Draw every figure of experiment `exp` and write report.html; returns its path."""
    exp = Path(exp)
    s = read_settings(exp)
    figures = exp / FIGURES_DIR
    shutil.rmtree(figures, ignore_errors=True)  # no figure of an earlier report is left behind
    figures.mkdir(parents=True)
    trials = read_trials(exp)
    sections = [search_section(exp, s, trials, figures), trials_section(trials), final_section(exp, figures),
                labels_section(exp, figures), *model_sections(exp, s, figures, data), settings_section(s, exp)]
    write_text(exp / REPORT_FILE, render(s, sections, summary(trials, exp)))
    log_to_tensorboard(exp, sections)
    return exp / REPORT_FILE


def report_at_end(exp: Path) -> None:
    """Write the report at the end of `search.run` or `search.final`; a failure is one line, the results stay."""
    try:
        print(f"report: {write_report(exp)} (figures in {exp / FIGURES_DIR})")
    except Exception as err:  # noqa: BLE001 - the search's results are written; the report can be redone
        print(f"report: not written ({type(err).__name__}: {err}); python -m search.report {exp} retries",
              file=sys.stderr)


