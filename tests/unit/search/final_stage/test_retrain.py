"""`search.final_stage.retrain`: a final run keeps the weights of its best PublicTest epoch (plain PyTorch, no Ray)."""
from __future__ import annotations

import numpy as np
import torch

import search.final_stage.retrain
from search.final_stage.retrain import retrain
from trainables.data import make_demo
from trainables.inference import predict
from trainables.models import build_model


def test_retrain_keeps_its_best_public_test_epoch(tmp_path, monkeypatch):
    """PublicTest accuracy 0.5, 0.7, 0.6: the run keeps epoch 2's weights, not the last epoch's."""
    data = make_demo(splits=["Training", "PublicTest"], n_train=140, n_val=70)
    config = {"width": 16, "depth": 2, "batch_size": 32, "lr": 0.05, "augment": "none"}
    forced, snapshots, real_epoch = [0.5, 0.7, 0.6], [], search.final_stage.retrain.run_epoch

    def epoch_with_forced_accuracy(run):
        metrics = real_epoch(run)
        snapshots.append({k: v.clone() for k, v in run.model.state_dict().items()})
        return {**metrics, "val_acc": forced[run.epoch - 1]}

    monkeypatch.setattr(search.final_stage.retrain, "run_epoch", epoch_with_forced_accuracy)
    out = retrain(config, data, epochs=3, seed=0, tensorboard_dir=str(tmp_path / "tb"))
    assert [h["val_acc"] for h in out["history"]] == forced
    assert out["best_epoch"] == 2 and out["val_acc"] == 0.7
    assert all(torch.equal(out["state_dict"][k], v) for k, v in snapshots[1].items())
    assert not all(torch.equal(out["state_dict"][k], v) for k, v in snapshots[2].items())
    assert sorted(out["val_probs"]) == ["flip", "none", "tencrop"]
    # PublicTest probabilities are those of the kept weights (epoch 2), not the last epoch's.
    model = build_model("convnet", num_classes=7, stem="stride", width=16, depth=2, dropout=0.0,
                        pretrained=False, input_size=48)
    model.load_state_dict(snapshots[1])
    np.testing.assert_allclose(out["val_probs"]["none"], predict(model, data.val.x).numpy(), atol=1e-6)
    model.load_state_dict(snapshots[2])
    assert not np.allclose(out["val_probs"]["none"], predict(model, data.val.x).numpy(), atol=1e-6)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
