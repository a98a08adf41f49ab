"""What the final stage leaves besides its tables and pictures: the ONNX exports of the best single model and
ensemble, final/README.md, and the table printed at the end."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from search.final_stage.retrain import FinalRun, seeds_of
from search.final_stage.scoring import ANALYSIS_TTA, DISTILLED, ensemble_members
from search.serving.deploy import classifier_from_weights, export_onnx
from search.tuning.settings import Settings
from trainables.files import write_text


def write_exports(out: Path, runs: Sequence[FinalRun], full: dict,
                  student: FinalRun | None = None) -> dict[str, Path]:
    """export/best_single.onnx and export/best_ensemble.onnx: chosen by PublicTest accuracy, calibrated; and
    export/best_distilled.onnx, the `student`, when there is one.

    The single run and the student carry their own temperature; the ensemble (the better of the two by
    PublicTest, without TTA) the temperature fitted to its mean softmax.
    """
    best = max(runs, key=lambda r: r.val_acc)
    kind = max(ensemble_members(runs), key=lambda k: full[k, ANALYSIS_TTA]["val_acc"])
    members = ensemble_members(runs)[kind]
    written = {}
    for label, weights, temperature, extra in (
            ("best_single", [best.weights], None, {"model": best.name}),
            ("best_ensemble", [r.weights for r in members], full[kind, ANALYSIS_TTA]["temperature"],
             {"model": kind})):
        if label == "best_ensemble" and [r.name for r in members] == [best.name]:
            # one configuration: its best-run "ensemble" is the best run itself, same probabilities
            shutil.copyfile(written["best_single"], out / "export" / f"{label}.onnx")
            written[label] = out / "export" / f"{label}.onnx"
            continue
        classifier, meta = classifier_from_weights(weights, temperature=temperature)
        meta.update(extra, val_acc_publictest=full[extra["model"], ANALYSIS_TTA]["val_acc"])
        written[label] = export_onnx(classifier, meta, out / "export" / f"{label}.onnx")
    if student is not None:
        classifier, meta = classifier_from_weights([student.weights])
        meta.update(model=student.name, val_acc_publictest=full[DISTILLED, ANALYSIS_TTA]["val_acc"])
        written["best_distilled"] = export_onnx(classifier, meta, out / "export" / "best_distilled.onnx")
    return written


def write_readme(out: Path, s: Settings, model: str, epochs: int, ttas: Sequence[str], *,
                 test_name: str = "PrivateTest") -> None:
    """final/README.md: what each file holds and which model the error analysis describes."""
    write_text(out / "README.md", f"""# Final stage of {s.name}

The top {s.final_top_k} configuration(s) of the search (by its objective, the best PublicTest
accuracy of a trial) were retrained from scratch on the full Training split for {epochs} epoch(s)
with seeds {seeds_of(s)} (never the search's own seed {s.seed}), a range-tested trial at the rate
its range test found (column `lr`); each run kept its best PublicTest epoch. Everything below was
measured once on {test_name}, which the search never read. TTA modes: {', '.join(ttas)}
(reported separately, never mixed).

- `metrics.csv`: one row per run and TTA mode (`kind` run), a `mean` and a sample `std` row per
  configuration and TTA mode, and the ensembles (`ensemble_all`: softmax average of every run;
  `ensemble_best`: of the best run per configuration by PublicTest). `val_acc` is the same
  model's PublicTest accuracy, `search_val_acc` the trial's during the search;
  `accuracy_dedup` leaves out the `n_duplicates` {test_name} images pixel-identical to a
  Training image (`n_dup_training`) or a PublicTest image (`n_dup_publictest`, the split that
  chose the models); F-beta uses beta={s.beta:g}. `truncated` marks a run the time budget cut
  before its schedule ended: it is kept, but the means and ensembles leave it out while any
  run finished its schedule.
- `per_class.csv`: precision, recall, F-beta and support per class, per model and TTA mode.
- `confusion_matrix.csv` / `.png`, `confused_pairs.csv`, `misclassified.csv` / `.png`: error
  analysis of **{model}**, the model with the best PublicTest accuracy without TTA; the pairs
  and mistakes are without TTA. `row` is the 0-based data row of the source CSV (line row + 2).
- Calibration: `temperature` is fitted per model and TTA mode on PublicTest (minimum NLL of
  `softmax(log p / T)`); `ece`, `nll` and `brier` are the {test_name} expected calibration
  error (15 bins, top label), log loss and multiclass Brier score before, `*_calibrated` after
  (accuracy does not change). `reliability.png`: the analysed model's diagram before and after.
  Each weights file carries its run's `temperature` (no TTA), which `search.predict` and the
  exported models apply.
- `export/best_single.onnx`, `export/best_ensemble.onnx`: the best run and the better ensemble
  by PublicTest accuracy, calibrated, for ONNX Runtime (see `python -m search.export_model`).
- `export/best_distilled.onnx` (with --distill, the default, when the ensemble has two or more
  runs): the `distilled` row of `metrics.csv`, one network of the best run's configuration that
  started from the best run's weights and was trained on Training with the exported ensemble's
  probabilities (softened at temperature 2, weight 0.7, the rest the label) as targets (the
  better of the two ensembles of two runs or more by PublicTest), keeping
  its best PublicTest epoch; it costs one model per face, the ensemble one per member.
- `kernels.png`, `activations.png`: the first-layer kernels of the best single run, and per
  emotion its mean PublicTest face with where its deepest convolution that keeps a spatial grid
  fires more (red) or less (blue) than on the average emotion.
- `label_audit.csv`, `label_issues.csv`, `label_issues_summary.csv`, `label_audit.png` (only when
  Microsoft's FER+ votes, fer2013new.csv, were beside the data or given with --ferplus): the
  analysed model's {test_name} predictions read against the FER+ majority of ten annotators
  (accuracy against each label and where the two agree; of its mistakes, the share where FER+
  sides with the model, the label or neither; per emotion), cleanlab's label issues ranked from
  its probabilities with their precision against FER+ (the share FER+ relabels, against the base
  rate), and its most confident mistakes beside their vote bars. It reports; it chose nothing.
- `models/<config>-seed<k>.pt`: state_dict, config and classes (`torch.load(..., weights_only=True)`,
  or `python -m search.evaluate --model ... --data ...`), with the config as JSON beside it.
- `tensorboard/<config>-seed<k>/`: per-epoch scalars of each run (`tensorboard --logdir {out}`).
""")


def _is_missing(value: Any) -> bool:
    return value is None or (pd.api.types.is_scalar(value) and pd.isna(value))


def print_table(df: pd.DataFrame) -> None:
    """Print the headline columns of metrics.csv."""
    cols = ["kind", "config", "seed", "tta", "val_acc", "accuracy", "accuracy_dedup", "fbeta_macro",
            "top2_accuracy"]
    view = df[cols].copy()
    view["config"] = view["config"].str.slice(0, 40)
    view["seed"] = view["seed"].map(lambda v: "" if _is_missing(v) else str(int(v)))
    print(view.to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep=""))
