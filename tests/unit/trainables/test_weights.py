"""`trainables.weights`: a weights file read back gives the same model (same predictions, with and without TTA)."""
from __future__ import annotations

import torch

from trainables.data import make_demo
from trainables.inference import predict
from trainables.models import build_model
from trainables.weights import load_weights, save_weights


def test_reloaded_weights_give_identical_predictions(tmp_path):
    torch.manual_seed(0)
    config = {"arch": "convnet", "width": 16, "depth": 2, "dropout": 0.1}
    model = build_model("convnet", num_classes=7, stem="stride", width=16, depth=2, dropout=0.1,
                        pretrained=False, input_size=48).eval()
    x = make_demo(splits=["PublicTest"], n_val=21).val.x
    path = save_weights(tmp_path / "m", model.state_dict(), config=config, classes=[str(i) for i in range(7)])
    loaded, meta = load_weights(path)
    for tta in ("none", "flip"):
        assert torch.equal(predict(model, x, tta=tta), predict(loaded, x, tta=tta))
    assert meta["config"]["width"] == 16 and meta["num_classes"] == 7
