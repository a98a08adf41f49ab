"""The final model from inside, for the report: where it looks (Grad-CAM), how it arranges faces, what a layer likes.

The model is the one the final stage's error analysis describes (`confused_pairs.csv` names
it): a single run, or an ensemble, whose Grad-CAM is the mean of its members' maps as its
probabilities are the mean of theirs. The feature space and the channels are those of its
best member by PublicTest accuracy (an ensemble has no single feature space). The images are
PublicTest's: the report explains, it does not evaluate, so it never reads PrivateTest (like
`activations.png`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from search.figures.explain import channel_responses, explained_layer, grad_cam, penultimate_features
from search.figures.plots import plot_embedding, plot_gradcam_grid, plot_mean_gradcam, plot_mistakes
from search.final_stage.retrain import run_name
from search.reporting.search_figures import NoData
from search.tuning.settings import Settings
from trainables.data import Split, load_fer2013
from trainables.device import pick_device
from trainables.errors import UserError
from trainables.inference import predict
from trainables.metrics import ensemble_probs
from trainables.weights import load_weights

EXAMPLES = 3          # correct and wrong faces shown per emotion
MEAN_PER_CLASS = 100  # correct faces per emotion averaged into its mean Grad-CAM
EMBEDDED = 2000       # PublicTest images in the t-SNE (a random sample beyond that: 8 s for 3,000 on 2 cores)
PAIRS = 3             # most confused emotion pairs joined in the embedding
CHANNELS, TOP_IMAGES = 6, 8


@dataclass(frozen=True)
class AnalysedModel:
    name: str
    members: list[Path]  # weight files: one for a run, several for an ensemble
    best: Path           # the member with the best PublicTest accuracy


@dataclass
class ModelView:
    """The analysed model's members loaded once, with their PublicTest probabilities, shared by the figures."""

    model: AnalysedModel
    split: Split
    classes: list[str]
    nets: list = field(default_factory=list)
    probs: list = field(default_factory=list)  # per member, (N, C)

    @classmethod
    def of(cls, model: AnalysedModel, split: Split, classes: list[str]) -> "ModelView":
        device = pick_device()  # the driver's GPU where it has one: Grad-CAM of a ResNet-50 is slow on a CPU
        nets = [load_weights(p, device=device)[0] for p in model.members]
        return cls(model, split, classes, nets, [predict(n, split.x).numpy() for n in nets])

    @property
    def best(self):
        """The best member's network and its probabilities (`analysed_model` picks it among the members)."""
        k = self.model.members.index(self.model.best)
        return self.nets[k], self.probs[k]


def analysed_model(final_dir: Path) -> AnalysedModel:
    """The model of the final stage's error analysis and its weight files; NoData before a final stage."""
    pairs, metrics = final_dir / "confused_pairs.csv", final_dir / "metrics.csv"
    if not (pairs.is_file() and metrics.is_file()):
        raise NoData("no final stage yet (python -m search.final <experiment> runs it)")
    first = pd.read_csv(pairs, nrows=1)
    name = str(first["model"].iloc[0]) if len(first) else ""  # no pair: a model that made no mistake
    table = pd.read_csv(metrics)
    runs = table[(table["kind"] == "run") & (table["tta"] == "none")].copy()
    runs["name"] = [run_name(config, int(seed)) for config, seed in zip(runs["config"], runs["seed"])]
    if name.startswith("ensemble") or name == "distilled":  # the student's row names its weights file
        row = table[(table["kind"] == name) & (table["tta"] == "none")]
        member_names = str(row["config"].iloc[0]).split("+") if len(row) else []
    else:
        member_names = [name] if name else list(runs["name"])
    members = [final_dir / "models" / f"{m}.pt" for m in member_names]
    missing = [p for p in members if not p.is_file()]
    if not members or missing:
        raise NoData(f"the final stage's weights are missing ({missing[0] if missing else 'no model named'})")
    ranked = runs[runs["name"].isin(member_names)].sort_values("val_acc", ascending=False)
    best = final_dir / "models" / f"{ranked['name'].iloc[0]}.pt" if len(ranked) else members[0]
    return AnalysedModel(name or member_names[0], members, best)


def load_public_test(s: Settings, data: str | None = None) -> tuple[Split, list[str]]:
    """PublicTest of the experiment's data (or `data`), and the class names; NoData when the data is not here."""
    path = data or s.data
    try:
        loaded = load_fer2013(path, splits=("PublicTest",), labels=s.labels, ferplus_path=s.ferplus or None,
                              seed=s.seed)
    except UserError as err:
        raise NoData(f"the experiment's data is not readable here ({err}); pass --data") from err
    return loaded.val, list(loaded.classes)


def _pick(order: np.ndarray, k: int) -> list[int]:
    return [int(i) for i in order[:k]]


def write_gradcam(figures: Path, view: ModelView) -> dict[str, str]:
    """gradcam_examples.png and gradcam_mean.png; returns their captions."""
    model, split, classes, nets = view.model, view.split, view.classes, view.nets
    probs = ensemble_probs(view.probs)
    pred, y = probs.argmax(1), split.y.numpy()

    def cam(idx: list[int], targets: np.ndarray) -> np.ndarray:
        if not idx:
            return np.zeros((0, *split.x.shape[-2:]), dtype=np.float32)
        x, t = split.x[idx], torch.as_tensor(targets, dtype=torch.long)
        return np.mean([grad_cam(n, x, t) for n in nets], axis=0)

    picked, captions = [], []
    for c in range(len(classes)):
        mine = np.flatnonzero(y == c)
        right, wrong = mine[pred[mine] == c], mine[pred[mine] != c]
        right = _pick(right[np.argsort(-probs[right, c], kind="stable")], EXAMPLES)
        wrong = _pick(wrong[np.argsort(-probs[wrong, pred[wrong]], kind="stable")], EXAMPLES)
        for group, mark in ((right, "right"), (wrong, "wrong")):
            picked += group + [-1] * (EXAMPLES - len(group))
            captions += [f"{mark}: {classes[pred[i]]} {probs[i, pred[i]]:.0%}" for i in group]
            captions += [""] * (EXAMPLES - len(group))
    shown = [i for i in picked if i >= 0]
    maps = cam(shown, pred[shown])
    images = np.zeros((len(picked), *split.x.shape[-2:]), dtype=np.uint8)
    grid = np.zeros(images.shape, dtype=np.float32)
    for k, i in enumerate(picked):
        if i >= 0:
            images[k], grid[k] = split.x[i].numpy(), maps[shown.index(i)]
    plot_gradcam_grid(images, grid, captions, classes, 2 * EXAMPLES, figures / "gradcam_examples.png",
                      title=f"Grad-CAM of the predicted class, {model.name} on PublicTest: per true emotion its "
                            f"{EXAMPLES} most confident right and wrong predictions")
    faces = np.zeros((len(classes), *split.x.shape[-2:]), dtype=np.float32)
    means, counts = np.zeros_like(faces), []
    for c in range(len(classes)):
        right = np.flatnonzero((y == c) & (pred == c))[:MEAN_PER_CLASS].tolist()
        counts.append(len(right))
        if right:
            faces[c] = split.x[right].float().mean(0).numpy()
            means[c] = cam(right, np.full(len(right), c)).mean(0)
    plot_mean_gradcam(faces, means, counts, classes, figures / "gradcam_mean.png",
                      title=f"mean Grad-CAM of the true class over correctly classified PublicTest faces, {model.name}")
    members = f" (mean of its {len(nets)} members' maps)" if len(nets) > 1 else ""
    return {"gradcam_examples.png": f"Where {model.name}{members} looks: Grad-CAM of the class it predicted, over "
                                    f"the {EXAMPLES} most confident right and wrong PublicTest predictions per true "
                                    f"emotion (red: regions that raised that class's score).",
            "gradcam_mean.png": f"Mean Grad-CAM per emotion over up to {MEAN_PER_CLASS} correctly classified "
                                f"PublicTest faces (number in brackets), over their mean face."}


def _embed(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """t-SNE (scikit-learn) to 2-D, after PCA to at most 50 dimensions, the usual preparation."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    reduced = PCA(n_components=min(50, *features.shape), random_state=seed).fit_transform(features)
    perplexity = float(min(30.0, (len(features) - 1) / 3))
    return TSNE(n_components=2, init="pca", learning_rate="auto", perplexity=perplexity,
                random_state=seed).fit_transform(reduced)


def confused_emotion_pairs(y: np.ndarray, pred: np.ndarray, n_classes: int) -> list[tuple[int, int]]:
    """Unordered emotion pairs by how often either is mistaken for the other, most confused first."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (y, pred), 1)
    both = cm + cm.T
    pairs = [(i, j) for i in range(n_classes) for j in range(i + 1, n_classes) if both[i, j] > 0]
    return sorted(pairs, key=lambda p: -both[p])


def write_embedding(figures: Path, view: ModelView) -> dict[str, str]:
    """embedding.png: t-SNE of the best member's penultimate features; returns its caption."""
    model, split, classes = view.model, view.split, view.classes
    keep = np.arange(len(split))
    if len(keep) > EMBEDDED:
        keep = np.sort(np.random.default_rng(0).choice(keep, EMBEDDED, replace=False))
    if len(keep) < 10:
        raise NoData(f"PublicTest has {len(keep)} images; the embedding needs at least 10")
    net, probs = view.best
    x, y = split.x[keep], split.y[keep].numpy()
    pred = probs[keep].argmax(1)
    xy = _embed(penultimate_features(net, x))
    pairs = confused_emotion_pairs(y, pred, len(classes))[:PAIRS]
    plot_embedding(xy, y, classes, pairs, figures / "embedding.png",
                   title=f"t-SNE of the penultimate-layer features of {model.best.stem} on {len(keep)} PublicTest "
                         f"images; dashed: the {len(pairs)} most confused pairs")
    centres = {c: np.median(xy[y == c], axis=0) for c in np.unique(y)}
    ranked = sorted(((i, j) for i in centres for j in centres if i < j),
                    key=lambda p: float(np.linalg.norm(centres[p[0]] - centres[p[1]])))
    where = ", ".join(f"{classes[i]}-{classes[j]} {ranked.index((i, j)) + 1}" for i, j in pairs if (i, j) in ranked)
    return {"embedding.png": f"The feature space the classifier separates emotions in (t-SNE, scikit-learn). The most "
                             f"confused pairs and how close their centres are (1 = closest of {len(ranked)} pairs): "
                             f"{where}."}


def write_top_activating(figures: Path, view: ModelView) -> dict[str, str]:
    """top_activating.png: the PublicTest faces that most excite a few channels of a deeper layer."""
    model, split, classes = view.model, view.split, view.classes
    net, _ = view.best
    layer = explained_layer(net, split.x)
    resp = channel_responses(net, split.x, layer)
    y = split.y.numpy()
    # The most emotion-selective channels: the largest ratio of one emotion's mean response to the mean over all.
    per_class = np.stack([resp[y == c].mean(0) if (y == c).any() else np.zeros(resp.shape[1])
                          for c in range(len(classes))])
    selectivity = per_class.max(0) / np.maximum(resp.mean(0), 1e-12)
    channels = np.argsort(-selectivity, kind="stable")[:CHANNELS]
    k = min(TOP_IMAGES, len(split))
    images, captions = [], []
    for ch in channels:
        top = np.argsort(-resp[:, ch], kind="stable")[:k]
        images += [split.x[i].numpy() for i in top]
        captions += [f"ch {ch} #{r + 1}\n{classes[y[i]]}" for r, i in enumerate(top)]
    plot_mistakes(np.stack(images), captions, figures / "top_activating.png", columns=k,
                  title=f"the {k} PublicTest faces that most activate {len(channels)} channels of "
                        f"{type(layer).__name__} ({resp.shape[1]} channels) in {model.best.stem}, one row per channel")
    return {"top_activating.png": f"One row per channel of a deeper convolution: the {k} faces that excite it most, "
                                  f"for the {len(channels)} channels most selective for one emotion."}


MODEL_FIGURES: dict[str, Callable] = {"gradcam": write_gradcam, "embedding": write_embedding,
                                      "top_activating": write_top_activating}
