"""The memory estimate: what it counts, the refusal of a trial that cannot fit, and its error on real peaks."""
from __future__ import annotations

import pytest

from trainables.memory import GIB, TrialDoesNotFit, check_fits, estimate_memory, measure_peak


def test_estimate_grows_with_batch_stem_and_optimizer_state():
    small = estimate_memory({"arch": "resnet18", "stem": "stride", "batch_size": 64})
    assert estimate_memory({"arch": "resnet18", "stem": "stride", "batch_size": 256})["bytes"] > small["bytes"]
    keep = estimate_memory({"arch": "resnet18", "stem": "keep", "batch_size": 64})
    assert keep["outputs_per_image"] == pytest.approx(4 * small["outputs_per_image"], rel=0.1)  # 4x the pixels
    adam = estimate_memory({"arch": "resnet18", "stem": "stride", "batch_size": 64, "optimizer": "adam"})
    assert adam["parameter_bytes"] - small["parameter_bytes"] == 4 * small["params"]  # one more state
    assert 11.1e6 < small["params"] < 11.3e6  # ResNet-18 with a 7-class head
    upsampled = estimate_memory({"arch": "resnet18", "stem": "imagenet", "input_size": 224, "batch_size": 64})
    assert upsampled["outputs_per_image"] > 10 * estimate_memory(
        {"arch": "resnet18", "stem": "imagenet", "batch_size": 64})["outputs_per_image"]


def test_a_trial_that_cannot_fit_is_refused_with_its_reason():
    config = {"arch": "resnet101", "stem": "keep", "batch_size": 256}
    need = estimate_memory(config)["bytes"]
    with pytest.raises(TrialDoesNotFit, match=r"needs \d+\.\d GiB \(estimated\), the largest node has 8\.0 GiB"):
        check_fits(config, 8 * GIB)
    check_fits(config, need + 1)  # fits: no error
    check_fits(config, None)  # no limit known: no error


@pytest.mark.slow
@pytest.mark.parametrize("config", [{"arch": "resnet50", "stem": "stride", "batch_size": 128},
                                    {"arch": "densenet121", "stem": "stride", "batch_size": 64}])
def test_estimate_within_tolerance_of_the_measured_peak(config):
    """Two training steps in a fresh process; the README states the error over the whole grid.

    Models of 2-4 GiB: resident memory also counts shared-library pages, which would swamp the
    1.2 GiB of a small ConvNet. Run late in the suite, from a pytest process grown to 3 GiB: the probe
    reads its own peak, not one inherited from its parent (ru_maxrss would be)."""
    ratio = estimate_memory(config)["bytes"] / measure_peak(config)
    assert 0.75 <= ratio <= 1.5, ratio
