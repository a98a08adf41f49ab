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


def test_a_final_run_asks_for_what_a_trial_of_its_configuration_asks_for():
    """Final tasks used to ask for --gpus-per-trial and CPUs only: two large configurations the search ran
    one per GPU then shared a card. Now each asks for its estimated GPU share and host memory."""
    from search.final_stage.retrain import task_options
    from trainables.config import TrialConfig

    small, large = TrialConfig(arch="convnet", width=16, batch_size=32), TrialConfig(arch="resnet50", batch_size=256)
    on_gpu = {"cpu": 1, "gpu": 0.25}
    card = {"cuda": 4 * 2**30}  # ResNet-50 at batch 256: about 3.2 GiB estimated in bf16
    assert task_options(small, on_gpu, card, 7) == {"num_cpus": 1, "num_gpus": 0.25}
    big = task_options(large, on_gpu, card, 7)
    assert big["num_cpus"] == 1 and 0.5 < big["num_gpus"] <= 1.0  # more than half the card: alone on it
    on_cpu = task_options(large, {"cpu": 2, "gpu": 0.0}, {"cpu": 16 * 2**30}, 7)
    assert on_cpu["num_cpus"] == 2 and on_cpu["num_gpus"] == 0
    assert on_cpu["memory"] > task_options(small, {"cpu": 2, "gpu": 0.0}, {"cpu": 16 * 2**30}, 7)["memory"]



def test_runs_sending_progress_never_run_beyond_their_cpus_and_every_event_arrives_in_order():
    # A Ray task blocked in ray.get lends its CPU back (ray.util.queue.Queue's put does that): with 4 runs
    # on 2 CPUs, Ray started a third beside the two running (measured: 3 at once). Sender never waits,
    # and a run's events have all reached the box, in order, once it has flushed.
    import time

    import ray

    from search.tuning.console import ProgressBox, Sender

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        box = ray.remote(num_cpus=0)(ProgressBox).remote()

        @ray.remote(num_cpus=1)
        def run(name, progress):
            start = time.time()
            for i in range(6):
                time.sleep(0.3)
                progress({"run": name, "epoch": i})
            progress.flush()
            return start, time.time()

        spans = ray.get([run.remote(n, Sender(box)) for n in "abcd"])
        changes = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
        at_once = [sum(d for _, d in changes[:k + 1]) for k in range(len(changes))]
        assert max(at_once) == 2, spans
        events = ray.get(box.take.remote())
        for name in "abcd":
            assert [e["epoch"] for e in events if e["run"] == name] == list(range(6))
        assert ray.get(box.take.remote()) == []  # taken once
    finally:
        ray.shutdown()
