"""Every space, sampled by Optuna and by FixedTrial: values in bounds, configs the trainable accepts."""
import optuna
import pytest

from spaces import FAMILIES, SPACES, archs_of, get_space
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
        assert 1e-6 <= full["weight_decay"] <= 1e-2
        assert 0.0 <= full["label_smoothing"] <= 0.2 and 0.0 <= full["dropout"] <= 0.5
        if full["lr_mode"] == "searched":
            assert 1e-4 <= cfg["lr"] <= 0.3
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
              "lr_mode": "searched", "lr": 1e-3, "weight_decay": 1e-4, "batch_size": 64, "schedule": "step",
              "warmup_fraction": 0.1, "step_fraction": 0.25, "step_gamma": 0.1, "augment": "mixup",
              "aug_magnitude": 0.5, "mix_alpha": 0.4, "label_smoothing": 0.1, "imbalance": "weighted_loss"}
    out = SPACES["resnet"](optuna.trial.FixedTrial(params))
    assert out["arch"] == "resnet34" and out["pretrained"] is False


def test_unknown_space_is_a_user_error():
    with pytest.raises(UserError, match="unknown space 'vit'; choose from"):
        get_space("vit")
