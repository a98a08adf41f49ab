"""`trainables.config`: typed trial configs, and older configs whose schedule settings were in epochs."""
from __future__ import annotations

import types

import pytest
import torch

from search.tuning.records import records_of
from trainables.config import TrialConfig, as_fractions, in_epochs
from trainables.errors import UserError
from trainables.models import build_model
from trainables.weights import load_weights, save_weights


def test_values_are_typed_once_and_unknown_keys_refused():
    cfg = TrialConfig.from_dict({"width": 64.0, "pretrained": "True", "convnet_arch": "convnet"})
    assert cfg.width == 64 and cfg.pretrained is True
    with pytest.raises(UserError, match="unknown hyperparameter"):
        TrialConfig.from_dict({"widht": 32})


def test_epoch_settings_become_fractions_of_the_run_that_used_them():
    old = {"schedule": "step", "step_epochs": 3, "warmup_epochs": 1.0, "plateau_patience": float("nan")}
    assert in_epochs(old) == ["warmup_epochs", "step_epochs", "plateau_patience"]
    new = as_fractions(old, epochs=10)
    assert new == {"schedule": "step", "step_fraction": 0.3, "warmup_fraction": 0.1}  # NaN: not used, dropped
    assert TrialConfig.from_dict(new).step_fraction == 0.3
    assert as_fractions({"lr": 0.1}, epochs=10) == {"lr": 0.1}
    with pytest.raises(UserError, match=r"schedule settings in epochs \(step_epochs\) are from an older version"):
        TrialConfig.from_dict({"step_epochs": 3})


def test_an_older_experiments_trials_are_read_as_fractions():
    trial = types.SimpleNamespace(trial_id="a", status="TERMINATED", path=None, last_result={},
                                  config={"schedule": "plateau", "plateau_patience": 2, "lr": 0.01})
    (record,) = records_of([trial], max_epochs=10)
    assert record.config == {"schedule": "plateau", "patience_fraction": 0.2, "lr": 0.01}


def test_an_older_weights_file_loads_with_fractions_of_its_run(tmp_path):
    model = build_model("convnet", num_classes=7, width=16, depth=2, dropout=0.0)
    path = save_weights(tmp_path / "m", model.state_dict(), config={"arch": "convnet", "width": 16, "depth": 2},
                        classes=[str(i) for i in range(7)], info={"history": [{}] * 8})
    ckpt = torch.load(path, weights_only=True)
    del ckpt["config"]["warmup_fraction"]
    ckpt["config"]["warmup_epochs"] = 2.0  # as an older version saved it
    torch.save(ckpt, path)
    _, meta = load_weights(path)
    assert meta["config"]["warmup_fraction"] == 0.25 and "warmup_epochs" not in meta["config"]
