"""Optimizers, schedules, the training loop, checkpoints, the LR range test and imbalance handling."""
import math

import pytest
import torch

from trainables.augment import build_augment
from trainables.data import FERData, Split, make_demo
from trainables.device import to_device
from trainables.errors import UserError
from trainables.lr_range import lr_range_test, suggest_lr
from trainables.models import build_model
from trainables.optim import OPTIMIZERS, SCHEDULES, Schedule, build_optimizer
from trainables.runner import build_run, load_run_state, run_epoch, run_state
from trainables.train import DivergedError, train_one_epoch


@pytest.fixture(scope="module")
def demo():
    return make_demo(n_train=700, n_val=210)


def _trace(name, epochs=4, steps=5, **kw):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = Schedule(opt, name, epochs=epochs, steps_per_epoch=steps, **kw)
    lrs = [s.lr]
    for step in range(epochs * steps):
        s.step_batch()
        if (step + 1) % steps == 0:
            s.step_epoch(0.5)  # a flat PublicTest accuracy: plateau must cut
        lrs.append(s.lr)
    return lrs


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_every_schedule_warms_up_linearly(name):
    lrs = _trace(name, warmup_fraction=0.25)
    start = 1 / 25 if name == "onecycle" else 0.0
    assert lrs[0] == pytest.approx(start + (1 - start) / 5, rel=1e-6)  # one epoch = 5 steps of warm-up
    assert all(b >= a - 1e-12 for a, b in zip(lrs[:4], lrs[1:5]))  # rising during warm-up
    assert max(lrs) == pytest.approx(1.0)


def test_schedule_shapes():
    cos = _trace("cosine")
    assert cos[0] == 1.0 and cos[-1] == pytest.approx(0.0, abs=1e-9) and cos[10] == pytest.approx(0.5, abs=0.05)
    one = _trace("onecycle")
    peak = one.index(max(one))
    assert 0 < peak < len(one) - 1 and one[0] == pytest.approx(1 / 25 + (1 - 1 / 25) / 6) and one[-1] < 1e-3
    step = _trace("step", step_fraction=0.25, step_gamma=0.1)  # cuts a quarter, half and three quarters in
    assert step[4] == 1.0 and step[5] == pytest.approx(0.1) and step[10] == pytest.approx(0.01)
    assert step[15] == step[20] == pytest.approx(0.001)  # no fourth cut at the very end
    assert set(_trace("constant")) == {1.0}
    plateau = _trace("plateau", patience_fraction=0.25, plateau_factor=0.5)  # 1 of the 4 epochs
    # Epoch 1 sets the best; each later flat epoch is one without improvement: cut after each.
    assert plateau[:10] == [1.0] * 10 and plateau[10] == 0.5 and plateau[-1] == 0.125


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_a_schedule_has_one_shape_at_any_length(name):
    """The search's 10-epoch trial on 30% of Training and the final stage's 40-epoch run on all of it:
    at the same point of the run, the same multiplier. In epochs, a cut every 3 epochs (gamma 0.1) gave
    the trial 3 cuts and the final run 13 (28 of its 40 epochs at <= 1e-4 of the peak)."""
    kw = dict(warmup_fraction=0.1, step_fraction=0.3, step_gamma=0.1, patience_fraction=0.2, plateau_factor=0.5)
    trial, final = _trace(name, epochs=10, steps=7, **kw), _trace(name, epochs=40, steps=23, **kw)
    for point in (0.2, 0.35, 0.5, 0.65, 0.95):
        a, b = trial[round(point * (len(trial) - 1))], final[round(point * (len(final) - 1))]
        assert a == pytest.approx(b, rel=0.15, abs=0.01), (point, a, b)
    peak = [lrs.index(max(lrs)) / (len(lrs) - 1) for lrs in (trial, final)]  # where the warm-up ends
    assert peak[0] == pytest.approx(peak[1], abs=1.5 / 70), peak
    if name == "step":
        assert min(trial) == min(final) == pytest.approx(1e-3)  # three cuts each
    if name == "plateau":  # flat accuracy: a cut every 2 of 10 epochs, every 8 of 40
        assert trial[-1] == pytest.approx(final[-1]) == 0.5 ** 4


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedule_state_round_trip(name):
    """A schedule restored mid-run (after warm-up steps and a plateau cut) continues exactly as the original."""
    kw = dict(epochs=4, steps_per_epoch=4, warmup_fraction=0.25, step_fraction=0.25, step_gamma=0.5,
              patience_fraction=0.25,
              plateau_factor=0.5)
    s = Schedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), name, **kw)
    for step in range(9):
        s.step_batch()
        if step % 4 == 3:
            s.step_epoch(0.5)  # flat accuracy: plateau cuts after the second epoch
    s2 = Schedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), name, **kw)
    s2.load_state_dict(s.state_dict())
    assert s2.lr == s.lr and s2.step_count == 9
    for step in range(7):
        s.step_batch()
        s2.step_batch()
        if step % 4 == 2:
            s.step_epoch(0.5)
            s2.step_epoch(0.5)
        assert s2.lr == s.lr
    if name == "plateau":
        assert s.plateau_scale < 1  # the state carried a cut, not only the step count


def test_optimizers_differ_as_documented():
    """One step from p=1 with a zero loss gradient, lr 0.1, weight decay 0.1 and momentum 0.9.

    SGD (Nesterov): grad = wd*p = 0.1, update 0.1 * (0.1 + 0.9*0.1) -> 0.981.
    Adam (coupled L2): grad 0.1, normalised to about 1 -> 1 - 0.1 = 0.9.
    AdamW (decoupled): the gradient is 0, only the decay acts -> 1 - 0.1*0.1 = 0.99.
    """
    after = {}
    for name in OPTIMIZERS:
        p = torch.nn.Parameter(torch.ones(3))
        opt = build_optimizer(name, [p], lr=0.1, weight_decay=0.1, momentum=0.9)
        (p * 0).sum().backward()
        opt.step()
        after[name] = p.detach()
    assert set(after) == {"sgd", "adam", "adamw"}
    assert torch.allclose(after["sgd"], torch.full((3,), 0.981))
    assert torch.allclose(after["adam"], torch.full((3,), 0.9), atol=1e-4)
    assert torch.allclose(after["adamw"], torch.full((3,), 0.99))


def test_momentum_reaches_each_optimizer():
    p = torch.nn.Parameter(torch.ones(1))
    sgd = build_optimizer("sgd", [p], lr=0.1, momentum=0.8).param_groups[0]
    assert sgd["momentum"] == 0.8 and sgd["nesterov"] is True
    assert build_optimizer("sgd", [p], lr=0.1, momentum=0.0).param_groups[0]["nesterov"] is False
    for name in ("adam", "adamw"):
        assert build_optimizer(name, [p], lr=0.1, momentum=0.8).param_groups[0]["betas"] == (0.8, 0.999)


def test_unknown_names_are_user_errors():
    with pytest.raises(UserError, match="unknown optimizer 'lion'"):
        build_optimizer("lion", [torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with pytest.raises(UserError, match="unknown schedule 'poly'"):
        _trace("poly")


def test_training_learns_demo_and_checkpoint_resumes(demo, one_thread):
    cfg = {"arch": "convnet", "width": 16, "lr": 0.05, "batch_size": 64, "augment": "none", "schedule": "cosine"}
    straight = build_run(cfg, demo, epochs=3, seed=0)
    history = [run_epoch(straight) for _ in range(3)]
    assert history[1]["train_loss"] < history[0]["train_loss"]
    assert history[1]["val_acc"] > 2 / 7  # well above chance after two epochs
    # The same run stopped after two epochs, checkpointed, and continued by a fresh Run built
    # with another seed: the checkpoint must carry model, optimizer, schedule and sampling RNG.
    first = build_run(cfg, demo, epochs=3, seed=0)
    run_epoch(first)
    run_epoch(first)
    state = run_state(first)
    resumed = build_run(cfg, demo, epochs=3, seed=1)
    load_run_state(resumed, state)
    assert resumed.epoch == 2 and resumed.schedule.step_count == first.schedule.step_count
    assert torch.equal(resumed.generator.get_state(), first.generator.get_state())
    momentum = [s["momentum_buffer"] for s in resumed.optimizer.state_dict()["state"].values()]
    assert momentum and all(torch.equal(a, s["momentum_buffer"]) for a, s in
                            zip(momentum, first.optimizer.state_dict()["state"].values()))
    last = run_epoch(resumed)
    assert last["epoch"] == 3 and last["lr"] == pytest.approx(history[2]["lr"])
    for key, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    assert last["val_acc"] == pytest.approx(history[2]["val_acc"])


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_non_finite_loss_raises_diverged(demo, kind):
    model = build_model("convnet", width=8)
    with torch.no_grad():
        if kind == "nan":
            for p in model.parameters():
                p.fill_(math.nan)
        else:  # finite logits whose per-sample losses (3e38) sum past float32's range
            model.head[-1].weight.zero_()
            model.head[-1].bias.fill_(-1.5e38)
            model.head[-1].bias[0] = 1.5e38
    opt = build_optimizer("sgd", model.parameters(), lr=0.1)
    sched = Schedule(opt, "constant", epochs=1, steps_per_epoch=1)
    with pytest.raises(DivergedError, match=f"training loss became {kind}"):
        train_one_epoch(model, opt, sched, to_device(demo.train, 7, torch.device("cpu")), batch_size=128,
                        augment=build_augment("none"), device=torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 autocast and channels-last are the CUDA path; "
                                                          "this machine has no GPU")
def test_cuda_path_trains_in_bf16_channels_last(demo):
    from trainables.augment import normalize
    from trainables.device import autocast, prepare_batch

    cuda = torch.device("cuda")
    run = build_run({"width": 16, "batch_size": 64}, demo, epochs=1, device=cuda)
    assert run.train.x.is_cuda and run.val.x.is_cuda  # the whole split lives on the GPU
    conv = next(m for m in run.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = prepare_batch(run.train.x[:8], cuda)
    assert x.is_contiguous(memory_format=torch.channels_last)
    with autocast(cuda):
        assert run.model(normalize(x)).dtype == torch.bfloat16
    metrics = run_epoch(run)
    assert math.isfinite(metrics["train_loss"]) and 0 <= metrics["val_acc"] <= 1


def test_balanced_sampler_and_class_weights(demo):
    counts = torch.bincount(demo.train.y, minlength=7)
    assert counts[1] < counts.float().mean()  # demo disgust is rare, like FER2013's
    run = build_run({"imbalance": "balanced_sampler", "width": 8}, demo, epochs=1)
    assert run.class_weights is None  # one correction, never both
    draws = torch.multinomial(run.sample_weights, 70000, replacement=True, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(demo.train.y[draws], minlength=7).float() / 70000
    assert torch.allclose(freq, torch.full((7,), 1 / 7), atol=0.01)
    run = build_run({"imbalance": "weighted_loss", "width": 8}, demo, epochs=1)
    w = run.class_weights
    assert run.sample_weights is None and w.argmax() == 1 and w.mean().item() == pytest.approx(1.0)
    assert w[1] / w[0] == pytest.approx((counts[0] / counts[1]).item(), rel=1e-5)
    with pytest.raises(UserError, match="unknown imbalance handling 'smote'"):
        build_run({"imbalance": "smote", "width": 8}, demo, epochs=1)


def test_lr_range_test_finds_rate_in_range(demo):
    torch.manual_seed(0)
    model = build_model("convnet", width=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = lr_range_test(model, to_device(demo.train, 7, torch.device("cpu")), batch_size=32,
                        start_lr=1e-5, end_lr=10.0, steps=100)
    losses = res["losses"]
    low = min(range(len(losses)), key=losses.__getitem__)
    assert losses[low] < losses[0] and losses[-1] > losses[low]  # falls, then rises
    # On the demo faces SGD's loss bottoms out near lr 0.1; the rule picks the steepest descent
    # before that minimum, 0.01-0.03 for seeds 0-2: one and a half decades of the six swept.
    assert 3e-3 <= res["suggested_lr"] < res["lrs"][low] <= 0.3
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # model restored


def test_suggest_lr_picks_steepest_descent():
    lrs = [10 ** (-6 + i * 0.1) for i in range(50)]
    losses = [2.0] * 20 + [1.9, 1.7, 1.0, 0.9] + [0.9 + 0.1 * i for i in range(26)]
    assert suggest_lr(lrs, losses) == lrs[21]  # where the loss falls fastest
    # Batch norm often lets the loss fall again after blowing up: never suggest past the minimum.
    blown = [2.0] * 20 + [1.9, 1.6, 1.2, 1.0] + [3.0, 5.0, 4.0, 2.0, 0.5, 0.6] + [1.0] * 20
    assert suggest_lr(lrs, blown) == lrs[21]


def test_a_short_sweep_reads_like_a_long_one():
    """The rule's skip and smoothing are fixed in decades: a 20-step sweep over 4 decades skips its first 3
    points (not 10 of its 20) and lags as many decades as torch-lr-finder's default does over 100 steps."""
    from trainables.lr_range import LAG_DECADES, SKIP_DECADES, skip_points, smoothing

    assert smoothing(1e-6, 3.0, 100) == pytest.approx(0.05, rel=0.01)  # the rule's calibration, kept
    lag_steps = (1 - smoothing(1e-5, 0.1, 20)) / smoothing(1e-5, 0.1, 20)
    assert lag_steps * 4 / 20 == pytest.approx(LAG_DECADES)
    lrs = [10 ** (-5 + i * 4 / 19) for i in range(20)]
    assert skip_points(lrs) == round(SKIP_DECADES / (4 / 19)) == 3
    # Falls fastest at the 6th point (1.1e-4): the old fixed skip of 10 points could never suggest it.
    losses = [2.0, 2.0, 1.99, 1.97, 1.8, 1.3, 1.1, 1.0, 0.98, 0.97] + [1.0 + 0.5 * i for i in range(10)]
    assert suggest_lr(lrs, losses) == lrs[5]
    # The old rule skipped past the minimum and fell back to a tenth of its rate.
    assert suggest_lr(lrs, losses, skip=10) == pytest.approx(lrs[9] / 10)


def test_an_hours_trial_affords_a_range_test_up_to_batch_128():
    from trainables.runner import plan_range_test

    n = round(0.3 * 28709)  # --train-fraction 0.3, first rung at epoch 2
    assert [plan_range_test(n, b, 2)["steps"] for b in (32, 64, 128, 256)] == [53, 26, 13, 0]


def test_weighted_loss_matches_hard_label_semantics():
    from trainables.train import _loss

    torch.manual_seed(0)
    logits, y = torch.randn(32, 7), torch.randint(0, 7, (32,))
    w = torch.rand(7) + 0.5
    onehot = torch.nn.functional.one_hot(y, 7).float()
    expected = torch.nn.functional.cross_entropy(logits, y, weight=w)
    assert _loss(logits, onehot, w, 0.0).item() == pytest.approx(expected.item(), rel=1e-5)
    # Smoothing must not shift probability towards heavily weighted classes: the loss with
    # a weight per class still prefers the true class over a rare, heavy one.
    heavy = torch.ones(7)
    heavy[1] = 16.0
    happy = torch.zeros(1, 7)
    happy[0, 3] = 1.0
    right, wrong = torch.zeros(1, 7), torch.zeros(1, 7)
    right[0, 3], wrong[0, 1] = 5.0, 5.0
    assert _loss(right, happy, heavy, 0.15) < _loss(wrong, happy, heavy, 0.15)


def test_plateau_does_not_count_warm_up_epochs():
    # Two warm-up epochs of flat accuracy, patience 1: without the rule both would count, and a
    # cut would land the moment the warm-up ends.
    lrs = _trace("plateau", epochs=5, steps=4, warmup_fraction=0.4, patience_fraction=0.2, plateau_factor=0.5)
    assert lrs[8] == pytest.approx(1.0)  # the first step after the warm-up: full rate, no cut yet
    assert lrs[12] == pytest.approx(0.5)  # one flat epoch after the warm-up: the first cut


@pytest.mark.parametrize("ema_fraction", [0.0, 0.1])
def test_resumed_run_reproduces_the_uninterrupted_one(demo, one_thread, ema_fraction):
    """Augmentation and dropout draw from torch's global RNG: the checkpoint carries it, so an
    interrupted-and-resumed run gives the uninterrupted run's per-epoch PublicTest accuracy
    (the averaged weights too, with EMA)."""
    cfg = {"width": 16, "batch_size": 64, "augment": "trivialaugment", "dropout": 0.3, "lr": 0.05,
           "ema_fraction": ema_fraction}
    straight = build_run(cfg, demo, epochs=3, seed=4)
    expected = [run_epoch(straight)["val_acc"] for _ in range(3)]
    first = build_run(cfg, demo, epochs=3, seed=4)
    got = [run_epoch(first)["val_acc"]]
    state = run_state(first)
    torch.manual_seed(123)  # whatever a new worker process would start from
    resumed = build_run(cfg, demo, epochs=3, seed=4, state=state)
    got += [run_epoch(resumed)["val_acc"] for _ in range(2)]
    assert got == expected


def test_range_test_is_bounded_by_the_trials_own_training():
    from trainables.runner import RANGE_TEST_MIN_STEPS, RANGE_TEST_SHARE, plan_range_test

    # A large batch on a tiny set (141 images, 1 epoch before the first rung): 14 images of
    # budget, not even one batch of 256, so no range test and the default rate instead.
    tiny = plan_range_test(141, 256, 1)
    assert tiny["steps"] == 0 and tiny["images"] == 0 and "skipped" in tiny["note"]
    # The full Training split, ASHA's first rung at epoch 2: at most 10% of 57,418 images.
    for batch, steps in ((64, 89), (256, 22)):
        full = plan_range_test(28709, batch, 2)
        assert full["steps"] == steps and full["note"] == ""
        assert full["images"] <= RANGE_TEST_SHARE * 28709 * 2
    assert plan_range_test(28709, 32, 30)["steps"] == 100  # the ceiling
    assert plan_range_test(28709, 256, 1)["steps"] == 0 < RANGE_TEST_MIN_STEPS  # 11 steps: too coarse


def test_range_test_in_a_run_reports_its_cost_or_falls_back(demo):
    from trainables.runner import FALLBACK_LR

    small = build_run({"lr_mode": "range_test", "optimizer": "adam", "batch_size": 128, "width": 8}, demo,
                      epochs=1)
    assert small.found_lr == FALLBACK_LR["adam"] and small.range_test["images"] == 0
    assert small.schedule.base_lrs == [FALLBACK_LR["adam"]]  # the run trains at the default rate
    big = build_run({"lr_mode": "range_test", "batch_size": 16, "width": 8}, demo, epochs=5)
    assert big.range_test["steps"] == 21 and big.range_test["images"] == 21 * 16  # 10% of 700 x 5 = 350
    assert big.range_test["seconds"] > 0 and big.found_lr != FALLBACK_LR["sgd"]


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


def test_ema_judges_the_run_by_its_averaged_weights(demo, one_thread):
    """With ema_fraction the run reports the averaged weights' PublicTest accuracy as val_acc (the live
    weights' as raw_val_acc), its window is that share of the run at any length, and a retrained run
    yields the averaged weights of its best epoch."""
    import dataclasses

    from search.final_stage.retrain import retrain, without_test
    from trainables.config import TrialConfig
    from trainables.inference import evaluate
    from trainables.runner import replan

    cfg = TrialConfig(width=16, batch_size=64, lr=0.05, schedule="onecycle", ema_fraction=0.1)
    run = build_run(cfg, demo, epochs=10, seed=1)
    steps = run.schedule.steps_per_epoch
    assert run.judged is run.ema.module and run.judged is not run.model
    metrics = run_epoch(run)
    assert metrics["val_acc"] == evaluate(run.ema.module, run.val)["val_acc"]
    assert metrics["raw_val_acc"] == evaluate(run.model, run.val)["val_acc"]
    averaged = next(run.ema.module.parameters())
    assert not torch.equal(averaged, next(run.model.parameters()))  # an average, not a copy
    # The window: 10% of 10 epochs of `steps` steps; re-planned to 20 epochs, twice as many steps.
    x = torch.zeros(1)
    ema_step = run.ema.multi_avg_fn
    before = torch.ones(1)
    ema_step([before], [x], 0)
    assert 1 - before.item() == pytest.approx(1 / (0.1 * 10 * steps))
    replan(run, 20)
    assert run.ema.multi_avg_fn is not ema_step
    before = torch.ones(1)
    run.ema.multi_avg_fn([before], [x], 0)
    assert 1 - before.item() == pytest.approx(1 / (0.1 * 20 * steps))
    # Off: no average, val_acc is the live weights' and there is no raw_val_acc.
    plain = build_run(dataclasses.replace(cfg, ema_fraction=0.0), demo, epochs=2, seed=1)
    assert plain.ema is None and plain.judged is plain.model and "raw_val_acc" not in run_epoch(plain)
    out = retrain(cfg, without_test(demo), epochs=3, seed=1, ttas=["none"])
    model = build_run(cfg, demo, epochs=3, seed=1).model
    model.load_state_dict(out["state_dict"])
    best = max(out["history"], key=lambda m: m["val_acc"])
    assert evaluate(model, run.val)["val_acc"] == pytest.approx(best["val_acc"]) == out["val_acc"]
    assert all("raw_val_acc" in m for m in out["history"])


def test_scoring_in_channels_last_gives_the_same_probabilities_and_leaves_the_weights_as_they_were():
    from trainables.augment import normalize
    from trainables.device import prepare_batch
    from trainables.inference import predict

    torch.manual_seed(0)
    model = build_model("convnet", num_classes=7, width=16).eval()
    x = torch.randint(0, 255, (40, 1, 48, 48), dtype=torch.uint8)
    with torch.no_grad():
        expected = model(normalize(prepare_batch(x, torch.device("cpu")))).softmax(1)
    conv = next(p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1)
    assert conv.is_contiguous()
    assert torch.allclose(predict(model, x), expected, atol=1e-5)
    assert conv.is_contiguous() and not conv.is_contiguous(memory_format=torch.channels_last)  # restored
    model.to(memory_format=torch.channels_last)  # a trial's model stays as it is
    assert torch.allclose(predict(model, x), expected, atol=1e-5)
    assert conv.is_contiguous(memory_format=torch.channels_last)
