"""The smaller commands (LR range test, augmentation preview) and the cluster config."""
from __future__ import annotations

import jsonschema
import pandas as pd
import pytest
import torch
import yaml

from tests.helpers import ROOT, run_command
from trainables.augment import POLICIES
from trainables.data import FERData, Split, make_demo
from trainables.runner import build_run


def test_lr_find_writes_curve_and_suggestion(tmp_path):
    r = run_command("search.lr_find", "--arch", "convnet", "--data", "demo", "--steps", "60", "--batch-size", "32",
                "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    curve = pd.read_csv(tmp_path / "convnet-sgd-bs32.csv")
    assert list(curve.columns) == ["lr", "loss"] and 20 <= len(curve) <= 60
    assert curve["lr"].is_monotonic_increasing
    assert (tmp_path / "convnet-sgd-bs32.png").stat().st_size > 1000
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("suggested learning rate:"))
    assert curve["lr"].min() <= float(line.split(":")[1]) <= curve["lr"].max()
    assert "rule: steepest descent" in r.stdout


def test_lr_find_rejects_unknown_model(tmp_path):
    r = run_command("search.lr_find", "--arch", "vgg", "--data", "demo", "--out", str(tmp_path))
    assert r.returncode == 2 and "unknown model 'vgg'" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("policy", ["strong", "cutmix"])
def test_augment_preview_writes_png(tmp_path, policy):
    out = tmp_path / f"{policy}.png"
    r = run_command("search.augment_preview", "--policy", policy, "--data", "demo", "--images", "3", "--draws", "4",
                "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert out.stat().st_size > 1000


def test_augment_preview_unknown_policy(tmp_path):
    r = run_command("search.augment_preview", "--policy", "sepia", "--data", "demo", "--out", str(tmp_path / "x.png"))
    assert r.returncode == 2 and "sepia" in r.stderr and sorted(POLICIES)[0] in r.stderr


def test_soft_labels_train_on_vote_distributions():
    demo = make_demo(n_train=140, n_val=70)
    n, c = len(demo.train), 8  # FER+ has 8 classes
    soft = torch.softmax(torch.randn(n, c), 1)
    train = Split(demo.train.x, soft.argmax(1), demo.train.rows, soft)
    val = Split(demo.val.x, demo.val.y % c, demo.val.rows)
    data = FERData(classes=tuple(f"c{i}" for i in range(c)), splits={"Training": train, "PublicTest": val},
                   source="test")
    run = build_run({"soft_labels": True, "width": 8}, data, epochs=1)
    assert torch.allclose(run.train.target, soft) and run.model(torch.zeros(2, 1, 48, 48)).shape == (2, 8)
    hard = build_run({"soft_labels": False, "width": 8}, data, epochs=1)
    assert set(hard.train.target.sum(1).tolist()) == {1.0} and hard.train.target.max() == 1.0


def test_cluster_yaml_is_a_valid_ray_cluster_config():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(config))
    assert "RAY_AUTH_MODE=token" in " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
    with pytest.raises(jsonschema.ValidationError, match="no_such_key"):
        validate_config({**prepare_config(config), "no_such_key": 1})


@pytest.mark.parametrize("arch", ["convnet", "resnet18", "densenet121"])
def test_kernels_and_activation_maps(tmp_path, arch, one_thread):
    from search.figures.plots import emotion_activations, plot_activations, plot_kernels
    from trainables.models import build_model

    demo = make_demo(n_train=70, n_val=70)
    model = build_model(arch, stem="stride").eval()
    faces, maps = emotion_activations(model, demo.val.x, demo.val.y, 7, per_class=4)
    assert faces.shape == maps.shape == (7, 48, 48)
    assert (maps >= 0).all() and (maps.reshape(7, -1).max(1) > 0).all()
    first = demo.val.x[demo.val.y == 0][:4].float().mean(0).numpy()
    assert faces[0] == pytest.approx(first)
    plot_kernels(model, tmp_path / "k.png")
    plot_activations(faces, maps, demo.classes, tmp_path / "a.png")
    assert (tmp_path / "k.png").stat().st_size > 1000 and (tmp_path / "a.png").stat().st_size > 1000


def test_checkpoint_policy():
    from trainables.tune_trainable import CHECKPOINT_SHARE, checkpoint_due

    rungs = [2, 6, 10]
    assert checkpoint_due(1, None, 5.0, rungs)  # the first save measures what saving costs
    assert checkpoint_due(3, 0.05, 5.0, rungs)  # a small model: 1% of an epoch, every epoch
    big = 4.0  # a large model on shared storage: 4 s per save
    assert not checkpoint_due(3, big, 60.0, rungs)  # 6.7% of the training since the last save
    assert checkpoint_due(6, big, 60.0, rungs)  # an ASHA rung
    assert checkpoint_due(10, big, 60.0, rungs)  # the last epoch
    assert checkpoint_due(5, big, big / CHECKPOINT_SHARE, rungs)  # enough training since the last save
