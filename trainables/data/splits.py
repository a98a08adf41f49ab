"""The FER2013 splits in memory: `Split`, `FERData`, the split and class names, and subsets.

`SEARCH_SPLITS` (Training, PublicTest) is all the search path may read; PrivateTest is
for the final evaluation only, and `FERData.test` says so when it was not loaded.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from trainables.errors import UserError

EMOTIONS: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
FERPLUS_CLASSES: tuple[str, ...] = (
    "neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt")
SPLITS = ("Training", "PublicTest", "PrivateTest")
SEARCH_SPLITS = ("Training", "PublicTest")   # the only ones the search path may read
LABEL_SETS = ("fer2013", "ferplus")
SIDE = 48
NPIX = SIDE * SIDE


@dataclass(frozen=True)
class Split:
    """One split held in memory: images, hard labels, source row indices and optional soft labels.

    `x` is uint8 (N, 48, 48), `y` int64 (N,), `rows` int64 (N,) is the 0-based data row in
    the source CSV (or the file order for image folders), and `soft` is float32 (N, C) with
    rows summing to 1 when the labels are FER+ vote distributions. `votes` is int16 (N, 10): the FER+
    vote counts of each image (`ferplus.VOTE_COLUMNS`) beside its FER2013 label, when they were loaded
    (`load_fer2013(..., votes=True)`).
    """

    x: torch.Tensor
    y: torch.Tensor
    rows: torch.Tensor
    soft: torch.Tensor | None = None
    votes: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = len(self.x)
        lengths = [len(self.y), len(self.rows)] + [len(t) for t in (self.soft, self.votes) if t is not None]
        if any(m != n for m in lengths):  # a bug in the caller, not a user error
            raise ValueError(f"Split fields differ in length: x has {n}, others {lengths}")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: Any) -> Split:
        """Return the split restricted to `idx` (a slice, index array/list/tensor or bool mask)."""
        if not isinstance(idx, (torch.Tensor, slice)):
            idx = torch.as_tensor(np.asarray(idx))
            if idx.numel() == 0:
                idx = idx.long()   # np.asarray([]) is float64, which torch refuses as an index
        soft = None if self.soft is None else self.soft[idx]
        votes = None if self.votes is None else self.votes[idx]
        return Split(self.x[idx], self.y[idx], self.rows[idx], soft, votes)


@dataclass(frozen=True)
class FERData:
    """The loaded splits (keys among `SPLITS`), their class names and where they came from.

    `test_name` is what outputs call the test split: "PrivateTest" when the source says
    that is what it holds, "test" for an image folder whose `test/` may be something else.
    """

    classes: tuple[str, ...]
    splits: dict[str, Split]
    source: str
    test_name: str = "PrivateTest"

    def _get(self, name: str) -> Split:
        if name not in self.splits:
            loaded = ", ".join(self.splits) or "none"
            raise UserError(
                f"split {name} was not loaded from {self.source} (loaded: {loaded}); "
                f"pass splits=[..., '{name}'] to load_fer2013"
                + ("; PrivateTest is for the final evaluation only" if name == "PrivateTest" else ""))
        return self.splits[name]

    @property
    def train(self) -> Split:
        return self._get("Training")

    @property
    def val(self) -> Split:
        return self._get("PublicTest")

    @property
    def test(self) -> Split:
        return self._get("PrivateTest")

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def check_splits(splits: Sequence[str]) -> tuple[str, ...]:
    """Validate requested split names; return them in canonical `SPLITS` order."""
    if isinstance(splits, str):
        splits = (splits,)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise UserError(f"unknown split(s) {unknown or list(splits)}; choose from {list(SPLITS)}")
    return tuple(s for s in SPLITS if s in splits)



def stratified_indices(y: np.ndarray, fraction: float, rng: np.random.Generator, *, for_val: bool) -> np.ndarray:
    """Pick round(fraction * n_c) indices per class, sorted. At least 1 per class present; when
    `for_val`, also leave at least 1 per class behind (a 1-image class stays in Training)."""
    picked = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        k = max(1, int(round(fraction * len(idx))))
        if for_val:
            k = min(k, len(idx) - 1)
        picked.append(rng.permutation(idx)[:k])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def stratified_fraction(split: Split, fraction: float, *, seed: int) -> Split:
    """Return a seeded, class-stratified subset of about `fraction` of `split` (original order kept).

    Each class present keeps round(fraction * count) samples and at least one; `fraction`
    must be in (0, 1], and 1.0 returns `split` itself.
    """
    if not 0 < fraction <= 1:
        raise UserError(f"fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return split
    idx = stratified_indices(split.y.numpy(), fraction, np.random.default_rng(seed), for_val=False)
    return split.subset(torch.from_numpy(idx))


def class_counts(split: Split, num_classes: int) -> torch.Tensor:
    """Return how many samples of each class `split` holds: int64 (num_classes,)."""
    return torch.bincount(split.y, minlength=num_classes).to(torch.int64)


def _image_digests(x: torch.Tensor) -> list[bytes]:
    flat = x.reshape(len(x), -1).contiguous().numpy()
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in flat]


def duplicate_mask(test: Split, train: Split) -> torch.Tensor:
    """Return bool (N_test,): True where a test image is pixel-identical to some train image."""
    seen = set(_image_digests(train.x))
    return torch.tensor([d in seen for d in _image_digests(test.x)], dtype=torch.bool)


