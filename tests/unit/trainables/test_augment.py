"""Augmentation policies: contract (shape, dtype, range, targets), per-sample randomness, seeds."""

import pytest
import torch
import torch.nn.functional as F

from trainables.augment import MEAN, POLICIES, STD, build_augment, normalize, to_input
from trainables.errors import UserError

BATCH = 16
MIXING = ("mixup", "cutmix")


pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(identical: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of random faces (or 16 copies of one) with one-hot targets."""
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(1 if identical else BATCH, 1, 48, 48, generator=gen).expand(BATCH, 1, 48, 48).contiguous()
    y = F.one_hot(torch.arange(BATCH) % 7, 7).float()
    return x, y


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policy_keeps_the_contract(name):
    x, y = _batch()
    out, targets = build_augment(name)(x, y)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert targets.shape == (BATCH, 7)
    torch.testing.assert_close(targets.sum(1), torch.ones(BATCH))
    assert (targets >= 0).all()


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_identical_faces_get_different_params(name):
    x, y = _batch(identical=True)
    torch.manual_seed(0)
    out, _ = build_augment(name)(x, y)
    distinct = len({tuple(row.tolist()) for row in out.flatten(1).round(decimals=4)})
    if name == "none":
        assert distinct == 1 and torch.equal(out, x)
    else:
        # A policy that drew one set of parameters for the whole batch would give 1.
        assert distinct >= BATCH // 2, f"{name}: only {distinct} distinct outputs of {BATCH}"


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_same_seed_same_output(name):
    x, y = _batch()
    aug = build_augment(name)
    torch.manual_seed(123)
    first = aug(x, y)
    torch.manual_seed(123)
    second = aug(x, y)
    third = aug(x, y)  # the RNG moved on
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    if name != "none":
        assert not torch.equal(first[0], third[0])


@pytest.mark.parametrize("name", MIXING)
def test_mixing_policies_mix_targets(name):
    x, y = _batch()
    torch.manual_seed(0)
    _, targets = build_augment(name)(x, y)
    blended = (targets.max(1).values < 1.0 - 1e-6).sum()
    assert blended >= BATCH // 4, f"{name}: only {int(blended)} of {BATCH} targets are blends"


def test_cutmix_targets_follow_pasted_area():
    # Each image is a distinct constant and the flip/crop stage is off, so a sample's share of
    # its own pixels must equal its own label's weight (1 when it was paired with itself).
    aug = build_augment("cutmix", num_classes=BATCH)
    aug.image_op = None
    x = torch.arange(BATCH, dtype=torch.float32).view(-1, 1, 1, 1).expand(BATCH, 1, 48, 48) / BATCH
    torch.manual_seed(3)
    out, targets = aug(x, torch.eye(BATCH))
    own_share = (out == x).float().mean(dim=(1, 2, 3))
    torch.testing.assert_close(targets.diagonal(), own_share)
    assert (own_share < 1).sum() >= BATCH // 2


def test_integer_labels_become_one_hot():
    x, _ = _batch()
    labels = torch.arange(BATCH) % 7
    _, targets = build_augment("flip_crop")(x, labels)
    assert torch.equal(targets, F.one_hot(labels, 7).float())


def test_magnitude_zero_strong_is_flip_crop_only():
    x, y = _batch()
    torch.manual_seed(0)
    out_strong, _ = build_augment("strong", magnitude=0.0)(x, y)
    torch.manual_seed(0)
    out_plain, _ = build_augment("flip_crop")(x, y)
    torch.testing.assert_close(out_strong, out_plain, atol=1e-4, rtol=0)  # warp rounding


def test_magnitude_scales_distortion():
    x, y = _batch()
    change = []
    for magnitude in (0.1, 1.0):
        torch.manual_seed(0)
        out, _ = build_augment("randaugment", magnitude=magnitude)(x, y)
        change.append((out - x).abs().mean())
    assert change[1] > change[0]


def test_gpu_and_cpu_op_paths_agree():
    # The GPU path (every op on every sample, then select) must equal the CPU path (each op on its
    # own samples); both run on the CPU here so the GPU path is tested without a GPU.
    from trainables.augment import _OPS, _apply_ops_masked, _apply_ops_subsets

    x, _ = _batch()
    x = x.repeat(4, 1, 1, 1)
    op = torch.arange(len(x)) % len(_OPS)  # every op, several times
    strength = torch.linspace(-1, 1, len(x))
    torch.testing.assert_close(_apply_ops_masked(x, op, strength), _apply_ops_subsets(x, op, strength),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs", [{"name": "autoaugment"}, {"name": "strong", "magnitude": 1.5},
                                    {"name": "mixup", "mix_alpha": 0.0}])
def test_bad_options_raise_user_error(kwargs):
    with pytest.raises(UserError, match="choose from|magnitude|mix_alpha"):
        build_augment(**kwargs)


def test_unknown_policy_lists_choices():
    with pytest.raises(UserError, match="flip_crop"):
        build_augment("nope")


def test_to_input_and_normalize():
    pixels = torch.tensor([[[0, 255], [129, 66]]], dtype=torch.uint8).repeat(3, 1, 1)
    x = to_input(pixels)
    assert x.shape == (3, 1, 2, 2) and x.dtype == torch.float32
    assert x.min() == 0.0 and x.max() == 1.0
    torch.testing.assert_close(normalize(x), (x - MEAN) / STD)
    # The Training split's mean grey (129.47) maps to about 0, one std (65.03) above it to about 1.
    torch.testing.assert_close(normalize(torch.tensor([129.47 / 255, (129.47 + 65.03) / 255])),
                               torch.tensor([0.0, 1.0]), atol=1e-3, rtol=0)
    with pytest.raises(TypeError):
        to_input(x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policy_runs_on_cuda(name):
    x, y = _batch()
    out, targets = build_augment(name)(x.cuda(), y.cuda())
    assert out.is_cuda and targets.is_cuda and out.shape == x.shape
