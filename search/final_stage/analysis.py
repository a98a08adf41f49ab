"""The final stage's error analysis and pictures: confusion, confused pairs, the most confident mistakes,
reliability, the label audit against FER+, first-layer kernels and activations per emotion."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from search.figures.plots import (
    emotion_activations,
    plot_activations,
    plot_confusion,
    plot_kernels,
    plot_mistakes,
    plot_reliability,
)
from search.final_stage.labels import headline, write_label_audit
from search.final_stage.retrain import FinalRun
from search.final_stage.scoring import ANALYSIS_TTA, confusion_table
from trainables.calibration import reliability
from trainables.data import EMOTIONS, FERData
from trainables.device import pick_device
from trainables.files import write_csv
from trainables.metrics import confused_pairs, misclassified
from trainables.weights import load_weights

MISTAKES_SHOWN = 36


def write_error_analysis(out: Path, model: str, full: dict, data: FERData, ttas: Sequence[str]) -> None:
    """Confusion matrix (CSV + PNG), confused pairs, misclassified images (CSV + PNG grid) of one model."""
    classes = data.classes
    write_csv(confusion_table(model, full, classes, ttas), out / "confusion_matrix.csv")
    plot_confusion({f"tta={t}": full[model, t]["confusion"] for t in ttas}, classes, out / "confusion_matrix.png",
                   title=f"{data.test_name} confusion of {model}")
    m = full[model, ANALYSIS_TTA]
    pairs = confused_pairs(m["confusion"], classes)
    pairs.insert(0, "tta", ANALYSIS_TTA)
    pairs.insert(0, "model", model)
    write_csv(pairs, out / "confused_pairs.csv")
    wrong = misclassified(m["probs"], data.test.y.numpy(), data.test.rows.numpy(), classes)
    shown = wrong.head(MISTAKES_SHOWN)
    captions = [f"row {r.row}\n{r.true} -> {r.predicted} {r.confidence:.0%}" for r in shown.itertuples()]
    plot_mistakes(data.test.x.numpy()[shown.index.to_numpy()], captions, out / "misclassified.png",
                  title=f"most confident {data.test_name} mistakes of {model} (tta={ANALYSIS_TTA})")
    wrong.insert(0, "tta", ANALYSIS_TTA)
    wrong.insert(0, "model", model)
    write_csv(wrong, out / "misclassified.csv")
    y = data.test.y.numpy()
    plot_reliability({f"{label} (ECE {m[f'ece{suffix}']:.1%})": reliability(probs, y)
                      for label, suffix, probs in (("before", "", m["probs"]),
                                                   (f"T = {m['temperature']:.2f}", "_calibrated",
                                                    m["probs_calibrated"]))},
                     out / "reliability.png",
                     title=f"{data.test_name} reliability of {model} (tta={ANALYSIS_TTA}; T fitted on PublicTest)")


def write_audit(out: Path, model: str, full: dict, data: FERData) -> str | None:
    """The label audit of `model` (`search.final_stage.labels`) when the test split carries FER+ votes; returns its
    headline, or None (no votes, or labels other than FER2013's)."""
    test = data.test
    if test.votes is None or tuple(data.classes) != EMOTIONS:
        return None
    return headline(*write_label_audit(out, model, full[model, ANALYSIS_TTA]["probs"], test.y.numpy(),
                                       test.votes.numpy(), test.rows.numpy(), test.x.numpy(), data.classes,
                                       split=data.test_name, tta=ANALYSIS_TTA))


def write_visualisations(out: Path, runs: Sequence[FinalRun], data: FERData) -> str:
    """kernels.png and activations.png of the best single run by PublicTest; returns its name.

    The activation maps are computed on PublicTest: a picture is not a choice, but there is
    no reason to read PrivateTest for it either.
    """
    best = max(runs, key=lambda r: r.val_acc)
    model, _ = load_weights(best.weights, device=pick_device())
    plot_kernels(model, out / "kernels.png", title=f"first-layer kernels of {best.name}")
    faces, maps = emotion_activations(model, data.val.x, data.val.y, data.num_classes)
    plot_activations(faces, maps, data.classes, out / "activations.png",
                     title=f"PublicTest mean face and activation relative to the average emotion, {best.name}")
    return best.name
