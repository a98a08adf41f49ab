"""Metrics against values computed by hand on a small fixed confusion, plus TTA and ensemble paths."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from trainables.metrics import (
    SCALAR_METRICS,
    classification_metrics,
    confused_pairs,
    ensemble_probs,
    masked_accuracy,
    misclassified,
    top_k_accuracy,
)

CLASSES = ("a", "b", "c")
# Ten samples. Confusion (rows true, columns predicted): a: 3 a, 1 b; b: 2 b, 1 c; c: 2 a, 1 c.
# Each row of PROBS is (predicted class, its probability, second choice) spelled out below.
Y = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
PROBS = np.array([
    [0.6, 0.3, 0.1], [0.6, 0.3, 0.1], [0.6, 0.1, 0.3],
    [0.3, 0.5, 0.2],    # true a, predicted b (50%), a second: a top-2 hit
    [0.1, 0.6, 0.3], [0.3, 0.6, 0.1],
    [0.2, 0.1, 0.7],    # true b, predicted c (70%), a second: a top-2 miss
    [0.1, 0.3, 0.6],
    [0.9, 0.04, 0.06],  # true c, predicted a (90%), c second: a top-2 hit
    [0.45, 0.35, 0.2],  # true c, predicted a (45%), b second: a top-2 miss
])
CM = np.array([[3, 1, 0], [0, 2, 1], [2, 0, 1]])


def test_metrics_match_hand_computed_values():
    m = classification_metrics(Y, PROBS, beta=1.0, class_names=CLASSES)
    # precision a 3/5, b 2/3, c 1/2; recall a 3/4, b 2/3, c 1/3; F1 a 2/3, b 2/3, c 0.4
    expected = {
        "accuracy": 0.6,
        "precision_macro": (0.6 + 2 / 3 + 0.5) / 3, "recall_macro": (0.75 + 2 / 3 + 1 / 3) / 3,
        "fbeta_macro": (2 / 3 + 2 / 3 + 0.4) / 3,
        "precision_weighted": (4 * 0.6 + 3 * 2 / 3 + 3 * 0.5) / 10, "recall_weighted": 0.6,
        "fbeta_weighted": (4 * 2 / 3 + 3 * 2 / 3 + 3 * 0.4) / 10,
        "top2_accuracy": 0.8, "top3_accuracy": 1.0,
    }
    assert set(expected) == set(SCALAR_METRICS)
    for key, value in expected.items():
        assert m[key] == pytest.approx(value), key
    assert m["n_images"] == 10
    np.testing.assert_array_equal(m["confusion"], CM)
    np.testing.assert_allclose(m["confusion_normalized"], CM / CM.sum(1, keepdims=True))
    per_class = m["per_class"].set_index("class")
    np.testing.assert_allclose(per_class["precision"], [0.6, 2 / 3, 0.5])
    np.testing.assert_allclose(per_class["recall"], [0.75, 2 / 3, 1 / 3])
    np.testing.assert_allclose(per_class["fbeta"], [2 / 3, 2 / 3, 0.4])
    assert per_class["support"].tolist() == [4, 3, 3]


def test_beta_weighs_recall():
    m = classification_metrics(Y, PROBS, beta=2.0, class_names=CLASSES)
    f2 = lambda p, r: 5 * p * r / (4 * p + r)  # noqa: E731
    expected = [f2(0.6, 0.75), f2(2 / 3, 2 / 3), f2(0.5, 1 / 3)]
    np.testing.assert_allclose(m["per_class"]["fbeta"], expected)
    assert m["fbeta_macro"] == pytest.approx(np.mean(expected))


def test_absent_class_keeps_its_row_and_counts_as_zero():
    y = np.array([0, 0, 1])
    probs = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1]])
    m = classification_metrics(y, probs, beta=1.0, class_names=CLASSES)
    assert m["per_class"]["support"].tolist() == [2, 1, 0]
    assert m["confusion"].shape == (3, 3) and m["confusion_normalized"][2].tolist() == [0, 0, 0]
    assert m["top2_accuracy"] == 1.0


def test_top_k_is_one_when_k_covers_every_class():
    assert top_k_accuracy(Y, PROBS, 3) == 1.0
    assert top_k_accuracy(Y, PROBS, 1) == pytest.approx(0.6)


def test_confused_pairs_most_frequent_first():
    pairs = confused_pairs(CM, CLASSES)
    assert pairs[["true", "predicted", "count"]].values.tolist() == [["c", "a", 2], ["b", "c", 1], ["a", "b", 1]]
    np.testing.assert_allclose(pairs["share_of_true"], [2 / 3, 1 / 3, 1 / 4])


def test_misclassified_most_confident_first_with_source_rows():
    rows = np.arange(100, 110)
    wrong = misclassified(PROBS, Y, rows, CLASSES)
    assert wrong["row"].tolist() == [108, 106, 103, 109]
    assert wrong.index.tolist() == [8, 6, 3, 9]  # positions, to pick the images
    assert wrong["true"].tolist() == ["c", "b", "a", "c"]
    assert wrong["predicted"].tolist() == ["a", "c", "b", "a"]
    np.testing.assert_allclose(wrong["confidence"], [0.9, 0.7, 0.5, 0.45])
    np.testing.assert_allclose(wrong["p_true"], [0.06, 0.1, 0.3, 0.2])


def test_masked_accuracy_leaves_out_masked_samples():
    keep = np.ones(10, bool)
    keep[[3, 6]] = False  # drop two mistakes: 6 right of 8
    assert masked_accuracy(Y, PROBS, keep) == pytest.approx(6 / 8)
    assert np.isnan(masked_accuracy(Y, PROBS, np.zeros(10, bool)))


def test_ensemble_is_the_softmax_average():
    other = np.roll(PROBS, 1, axis=1)
    avg = ensemble_probs([PROBS, other])
    np.testing.assert_allclose(avg, (PROBS + other) / 2)
    np.testing.assert_allclose(avg.sum(1), 1.0)
    np.testing.assert_allclose(ensemble_probs([PROBS]), PROBS)
    with pytest.raises(ValueError):
        ensemble_probs([])


def test_shape_mismatch_is_a_bug_not_a_number():
    with pytest.raises(ValueError):
        classification_metrics(Y, PROBS[:, :2], beta=1.0, class_names=CLASSES)


class _LeftRight(torch.nn.Module):
    """Logits from the left and right halves' mean brightness: flipping the image swaps them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.shape[-1] // 2
        left, right = x[..., :w].mean((1, 2, 3)), x[..., w:].mean((1, 2, 3))
        return torch.stack([4 * left, 4 * right, torch.zeros_like(left)], 1)


@pytest.mark.parametrize("tta", ["none", "flip", "tencrop"])
def test_tta_views_are_averaged(tta):
    from trainables.inference import predict

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (5, 48, 48), dtype=torch.uint8, generator=gen)
    x[:, :, :24] //= 4  # a dark left half, so the two logits differ
    model = _LeftRight()
    probs = predict(model, x, device=torch.device("cpu"), tta=tta)
    assert probs.shape == (5, 3)
    torch.testing.assert_close(probs.sum(1), torch.ones(5))
    plain = predict(model, x, device=torch.device("cpu"))
    mirrored = predict(model, x.flip(-1), device=torch.device("cpu"))
    if tta == "none":
        torch.testing.assert_close(probs, plain)
        return
    # Every view comes with its mirror, which swaps the two logits: the average is symmetric.
    torch.testing.assert_close(probs[:, 0], probs[:, 1])
    assert not torch.allclose(probs, plain)
    flip = (plain + mirrored) / 2
    if tta == "flip":
        torch.testing.assert_close(probs, flip)
    else:  # ten shifted crops: not the same numbers as the plain flip
        assert not torch.allclose(probs, flip)


def test_scoring_never_autocasts(monkeypatch):
    """Scores are fp32 on every device: predict must not enter torch.autocast (bf16 on CUDA)."""
    from trainables.data import make_demo
    from trainables.inference import predict
    from trainables.models import build_model

    def forbidden(*args, **kwargs):
        raise AssertionError("predict entered torch.autocast")

    monkeypatch.setattr(torch, "autocast", forbidden)
    model = build_model("convnet", width=8, depth=2).eval()
    probs = predict(model, make_demo(splits=["PublicTest"], n_val=14).val.x, tta="flip")
    assert probs.dtype == torch.float32 and torch.allclose(probs.sum(1), torch.ones(14))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compares CPU and CUDA scores; this machine has no GPU")
def test_cpu_and_cuda_scores_agree():
    from trainables.data import make_demo
    from trainables.inference import predict
    from trainables.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet18", stem="stride").eval()
    x = make_demo(splits=["PublicTest"], n_val=64).val.x
    cpu = predict(model, x, device=torch.device("cpu"))
    cuda = predict(model.to("cuda").to(memory_format=torch.channels_last), x, device=torch.device("cuda"))
    assert torch.allclose(cpu, cuda, atol=2e-3)  # cuDNN may use TF32 convolutions: close, not equal
    assert (cpu.argmax(1) == cuda.argmax(1)).float().mean() >= 0.98
