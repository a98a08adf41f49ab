"""Every space, sampled by Optuna and by FixedTrial: values in bounds, configs the trainable accepts."""
import optuna
import pytest

from spaces import FAMILIES, LR_RANGES, SPACES, archs_of, decay_name, get_space, lr_name, with_optuna_names
from trainables.augment import POLICIES
from trainables.config import OPTUNA_ONLY, TrialConfig, field_names
from trainables.errors import UserError
from trainables.models import MODELS
from trainables.optim import OPTIMIZERS, SCHEDULES
from trainables.runner import IMBALANCE, LR_MODES

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _sample(space, n=40, **kwargs):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    configs = []
    for _ in range(n):
        trial = study.ask()
        constants = space(trial, **kwargs)
        configs.append({**trial.params, **constants})
        study.tell(trial, 0.5)
    return configs


@pytest.mark.parametrize("name", sorted(SPACES))
def test_space_samples_valid_configs(name):
    configs = _sample(SPACES[name], offer_weights=True, ferplus=True)
    for cfg in configs:
        full = TrialConfig.from_dict(cfg).to_dict()  # raises on a key that is not a hyperparameter
        assert full["arch"] in MODELS and full["arch"] in archs_of(name)
        assert full["optimizer"] in OPTIMIZERS and full["schedule"] in SCHEDULES
        assert full["augment"] in POLICIES and full["imbalance"] in IMBALANCE
        assert full["batch_size"] in (32, 64, 128, 256)
        adamw = full["optimizer"] == "adamw"  # decoupled decay, far stronger than an L2 penalty
        assert (1e-3 <= full["weight_decay"] <= 0.3) if adamw else (1e-6 <= full["weight_decay"] <= 1e-2)
        assert cfg[decay_name(full["optimizer"])] == full["weight_decay"]
        assert 0.0 <= full["label_smoothing"] <= 0.2 and 0.0 <= full["dropout"] <= 0.5
        if full["lr_mode"] == "searched":
            # Each optimizer's rate under its own name, in its own range, returned as `lr`.
            low, high = LR_RANGES[lr_name(full["optimizer"])]
            assert low <= cfg["lr"] <= high and cfg[lr_name(full["optimizer"])] == cfg["lr"]
            assert not {"sgd_lr", "adam_lr"} - {lr_name(full["optimizer"])} & set(cfg)
        else:
            assert "lr" not in cfg  # the trial finds its own rate
        assert set(cfg) <= set(field_names()) | set(OPTUNA_ONLY)
    archs = {c["arch"] for c in configs}
    assert len(archs) == len(archs_of(name)) or len(configs) < 10  # every arch is reachable


def test_all_space_covers_every_family():
    archs = {c["arch"] for c in _sample(SPACES["all"], n=60)}
    assert {fam_archs[0] for fam_archs in FAMILIES.values()} <= archs


def test_space_searches_every_registered_choice():
    """What the convnet space draws is what the registries hold: a policy, schedule, optimizer or
    imbalance mode dropped from the space, or registered but never searched, fails here."""
    configs = _sample(SPACES["convnet"], n=200)
    assert {c["augment"] for c in configs} == set(POLICIES)
    assert {c["schedule"] for c in configs} == set(SCHEDULES)
    assert {c["optimizer"] for c in configs} == set(OPTIMIZERS)
    assert {c["imbalance"] for c in configs} == set(IMBALANCE)
    assert {c["lr_mode"] for c in configs} == set(LR_MODES)


def test_pretrained_only_when_allowed():
    assert all(c["pretrained"] is False for c in _sample(SPACES["resnet"], offer_weights=False))
    assert {c["pretrained"] for c in _sample(SPACES["resnet"], offer_weights=True)} == {False, True}


def test_fixed_trial_gives_constants():
    params = {"resnet_arch": "resnet34", "stem": "keep", "dropout": 0.1, "optimizer": "adamw",
              "lr_mode": "searched", "adam_lr": 1e-3, "adamw_weight_decay": 1e-2, "batch_size": 64, "schedule": "step",
              "warmup_fraction": 0.1, "step_fraction": 0.25, "step_gamma": 0.1, "augment": "mixup",
              "aug_magnitude": 0.5, "mix_alpha": 0.4, "label_smoothing": 0.1, "imbalance": "weighted_loss"}
    out = SPACES["resnet"](optuna.trial.FixedTrial(params))
    assert out["arch"] == "resnet34" and out["pretrained"] is False
    assert out["lr"] == 1e-3 and out["weight_decay"] == 1e-2  # returned under the names the trainable reads


def test_unknown_space_is_a_user_error():
    with pytest.raises(UserError, match="unknown space 'vit'; choose from"):
        get_space("vit")


def test_tpe_learns_each_optimizers_rate_apart():
    """A synthetic objective where SGD is best at 0.1 and Adam/AdamW at 1e-3: the search's TPE (multivariate,
    grouped, per-optimizer names) moves each optimizer's rate towards its own optimum. With one `lr`
    pooled over the optimizers and independent TPE, good Adam rates pulled SGD's samples down."""
    import math

    from search.run import tpe_sampler

    study = optuna.create_study(direction="maximize", sampler=tpe_sampler(seed=0, n_startup_trials=10))
    best = {"sgd": 0.1, "adam": 1e-3, "adamw": 1e-3}
    drawn = {"sgd": [], "adam": []}
    for _ in range(70):
        trial = study.ask()
        constants = SPACES["convnet"](trial)
        cfg = {**trial.params, **constants}
        if cfg["lr_mode"] != "searched":
            study.tell(trial, 0.0)
            continue
        distance = abs(math.log10(cfg["lr"] / best[cfg["optimizer"]]))
        study.tell(trial, 0.7 - 0.2 * distance)
        drawn["sgd" if cfg["optimizer"] == "sgd" else "adam"].append(distance)
    # TPE settles on one optimizer family; the rates it draws for it converge on that family's optimum
    # (median distance of the last 10 under 0.2 decades, against about 0.8 for the first draws).
    most = max(drawn.values(), key=len)
    assert len(most) >= 30 and sorted(most[-10:])[5] < 0.2 and sorted(most[:5])[2] > 0.4, drawn


def test_a_config_written_with_lr_replays_under_the_per_optimizer_names():
    assert with_optuna_names({"optimizer": "sgd", "lr": 0.01, "weight_decay": 5e-4}) == {
        "optimizer": "sgd", "lr": 0.01, "weight_decay": 5e-4, "sgd_lr": 0.01}
    out = with_optuna_names({"optimizer": "adamw", "lr_mode": "range_test", "weight_decay": 0.01})
    assert out["adamw_weight_decay"] == 0.01 and "adam_lr" not in out


def test_a_search_wide_constant_joins_every_configuration_and_pickles_with_the_searcher():
    import pickle
    from functools import partial

    import optuna

    from spaces import get_space, with_constants

    space = partial(with_constants, space=partial(get_space("convnet"), ferplus=False),
                    constants={"ema_fraction": 0.1})
    space = pickle.loads(pickle.dumps(space))  # Tune checkpoints the searcher, space included
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    assert space(trial)["ema_fraction"] == 0.1 and "ema_fraction" not in trial.params  # a constant, not drawn


def test_the_range_test_knows_where_each_optimizers_good_rates_lie():
    from spaces import LR_RANGES, lr_name
    from trainables.lr_range import GOOD_RATES, SWEEP, within_good_rates

    assert {opt: LR_RANGES[lr_name(opt)] for opt in GOOD_RATES} == GOOD_RATES
    assert SWEEP["sgd"] == pytest.approx((1e-4, 3.0)) and SWEEP["adamw"] == pytest.approx((1e-5, 0.1))
    assert within_good_rates("sgd", 1e-5) == 1e-3 and within_good_rates("adam", 0.5) == 1e-2
    assert within_good_rates("adamw", 3e-3) == 3e-3
