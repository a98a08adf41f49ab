"""What the sampler knows before the first trial: an earlier experiment's trials, and known-good configurations.

`--warm-start results/<earlier>` adds the finished trials of an earlier experiment to the new
study as completed trials (Optuna's `add_trial`), so TPE models them from the start instead of
sampling its first trials at random. Each earlier config is replayed through the new space
(`optuna.trial.FixedTrial`), which gives the new space's distributions; a trial whose
parameters the new space lacks or does not contain is left out, and the command says how many
fit. Ray's `OptunaSearch` cannot take `evaluated_rewards` with a define-by-run space, so the
study is built here in the experiment's Optuna storage (`optuna.db`, see `search.tuning.study`) that
`OptunaSearch` then loads (`storage`, `study_name`).

The known-good configurations of each space are enqueued (`enqueue_trial`) to run first,
unless --no-known-good. Where each comes from is written beside it.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

from search.tuning.records import TrialRecord, load_trials
from search.tuning.study import STUDY_NAME, open_storage
from trainables.errors import UserError

# A published FER2013 recipe: Khaireddin & Chen, "Facial Emotion Recognition: State of the Art
# Performance on FER2013" (2021, arXiv:2105.03588) train a VGG-style network with SGD, Nesterov
# momentum 0.9 (our SGD's), learning rate 0.01 and a reduce-on-plateau schedule, with shift,
# rotation, flip and erasing augmentation (our `strong`). Batch 64, weight decay 5e-4, patience a
# fifth of the run (2 epochs of a 10-epoch trial) and factor 0.5 are the values of our ranges
# nearest to a plateau schedule over a short run.
_PUBLISHED_SGD_PLATEAU = {
    "optimizer": "sgd", "lr_mode": "searched", "lr": 0.01, "weight_decay": 5e-4, "batch_size": 64,
    "schedule": "plateau", "patience_fraction": 0.2, "plateau_factor": 0.5, "warmup_fraction": 0.0,
    "augment": "strong", "aug_magnitude": 0.5, "label_smoothing": 0.0, "imbalance": "none",
}
# The one-cycle policy (Smith & Topin, "Super-Convergence", 2019, who used SGD) with AdamW, as
# fast.ai trains on a short budget (Gugger & Howard, "AdamW and Super-convergence is now the
# fastest way to train neural nets", 2018): a peak rate of 3e-3 rising over 30% of the run and
# annealing once, decoupled weight decay (Loshchilov & Hutter, ICLR 2019) at 1e-2, PyTorch's
# AdamW default and the low end of the 1e-2..1e-1 where decoupled decay is set; flips and
# crops, label smoothing 0.1. (Until this version the decay was 1e-4, almost none.)
_ONECYCLE_ADAMW = {
    "optimizer": "adamw", "lr_mode": "searched", "lr": 3e-3, "weight_decay": 1e-2, "batch_size": 128,
    "schedule": "onecycle", "warmup_fraction": 0.0, "augment": "flip_crop", "label_smoothing": 0.1,
    "imbalance": "none",
}
KNOWN_GOOD: dict[str, list[dict[str, Any]]] = {
    "convnet": [
        {"width": 64, "depth": 3, "dropout": 0.3, **_PUBLISHED_SGD_PLATEAU},
        {"width": 32, "depth": 3, "dropout": 0.2, **_ONECYCLE_ADAMW},
    ],
    "resnet": [
        {"resnet_arch": "resnet18", "stem": "keep", "dropout": 0.2, **_PUBLISHED_SGD_PLATEAU},
        {"resnet_arch": "resnet18", "stem": "stride", "dropout": 0.2, **_ONECYCLE_ADAMW},
    ],
    "densenet": [
        {"densenet_arch": "densenet121", "stem": "keep", "dropout": 0.2, **_PUBLISHED_SGD_PLATEAU},
    ],
}
KNOWN_GOOD["all"] = [{"family": family, **config} for family in ("convnet", "resnet") for config in KNOWN_GOOD[family]]
# Both recipes train from scratch on the hard labels; these keys matter only where the space
# offers ImageNet weights or FER+ votes (a key the space does not draw is ignored).
for _config in (c for configs in KNOWN_GOOD.values() for c in configs):
    _config.update(pretrained=False, soft_labels=False, ferplus_votes=0.0)


def replay(space: Callable, config: dict[str, Any]):
    """`config` run through `space`: (params, distributions), or a ValueError saying why it does not fit."""
    import optuna

    from spaces import with_optuna_names

    trial = optuna.trial.FixedTrial(with_optuna_names(config))  # raises ValueError for a parameter it lacks
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a value outside the space: FixedTrial only warns, create_trial refuses
        space(trial)
    optuna.trial.create_trial(params=trial.params, distributions=trial.distributions, value=0.0)
    return trial.params, trial.distributions


def known_good(space_name: str, space: Callable) -> list[dict[str, Any]]:
    """The space's known-good configurations, as Optuna parameters."""
    return [replay(space, config)[0] for config in KNOWN_GOOD.get(space_name, [])]


def _same_data(a: str, b: str) -> bool:
    """Whether two --data values name the same data: the same path, or files of one name and size."""
    if a == b or "demo" in (a, b):
        return a == b
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.resolve() == pb.resolve():
        return True
    return pa.name == pb.name and pa.is_file() and pb.is_file() and pa.stat().st_size == pb.stat().st_size


def comparable(earlier, current, experiment: Path) -> str:
    """Refuse an earlier experiment whose objectives mean something else (other labels, other data); return a
    note when only the fidelity differs (other --train-fraction or --max-epochs), whose values are a prior."""
    if earlier.labels != current.labels:
        raise UserError(f"--warm-start {experiment}: its trials were scored on {earlier.labels} labels and this "
                        f"search uses {current.labels}; their accuracies are not comparable")
    if not _same_data(earlier.data, current.data):
        raise UserError(f"--warm-start {experiment}: its trials were trained on --data {earlier.data}, this search "
                        f"on {current.data}; their accuracies are not comparable")
    if (earlier.train_fraction, earlier.max_epochs) != (current.train_fraction, current.max_epochs):
        return (f" (at another fidelity: --train-fraction {earlier.train_fraction:g} and --max-epochs "
                f"{earlier.max_epochs} there, {current.train_fraction:g} and {current.max_epochs} here, so its "
                f"values are a prior on this search's, not the same measure)")
    if earlier.ema_fraction != current.ema_fraction:
        return (f" (judged with --ema-fraction {earlier.ema_fraction:g} there, {current.ema_fraction:g} here, so "
                f"its values are a prior on this search's, not the same measure)")
    return ""


def earlier_trials(experiment: Path, space: Callable, space_name: str, current=None) -> tuple[list, str]:
    """The finished trials of `experiment` that fit `space`, as Optuna FrozenTrials, and a line saying so.

    With `current` (this search's Settings) an experiment of other labels or data is refused, and one of
    another fidelity said so (see `comparable`)."""
    import optuna

    from search.tuning.settings import read_settings

    earlier = read_settings(experiment)
    fidelity = comparable(earlier, current, experiment) if current is not None else ""
    records: list[TrialRecord] = [r for r in load_trials(experiment, earlier.max_epochs, earlier.storage)
                                  if r.status not in ("ERROR", "RUNNING", "PENDING", "PAUSED")
                                  and math.isfinite(r.objective)]
    if not records:
        raise UserError(f"--warm-start {experiment}: the experiment has no finished trial")
    trials, reasons = [], []
    for r in records:
        try:
            params, distributions = replay(space, r.config)
            trials.append(optuna.trial.create_trial(params=params, distributions=distributions, value=r.objective,
                                                    user_attrs={"warm_start": f"{experiment.name}/{r.trial_id}"}))
        except ValueError as err:
            reasons.append(str(err).strip().splitlines()[0])
    if not trials:
        raise UserError(f"--warm-start {experiment}: none of its {len(records)} finished trials fits the space "
                        f"'{space_name}' (e.g. {reasons[0]})")
    note = (f"warm start: {len(trials)} of {len(records)} finished trials of {experiment} (space {earlier.space}) "
            f"seed the sampler{fidelity}")
    if reasons:
        note += f"; {len(reasons)} do not fit the space '{space_name}' and are left out (e.g. {reasons[0]})"
    return trials, note


@dataclass(frozen=True)
class StudySeed:
    """What the study starts with: earlier trials to add, known-good parameters to enqueue, lines to print."""

    trials: list = field(default_factory=list)
    enqueued: list = field(default_factory=list)
    notes: list = field(default_factory=list)


def study_seed(space_name: str, *, ferplus: bool, offer_weights: bool, warm_start: str,
               use_known_good: bool, current=None, votes: bool = False) -> StudySeed:
    """The earlier trials of --warm-start that fit the space and its known-good configurations; writes nothing,
    so a bad --warm-start fails before anything is created. `current`: this search's Settings, against which
    the earlier experiment's labels, data and fidelity are compared."""
    from spaces import get_space

    space = partial(get_space(space_name), ferplus=ferplus, offer_weights=offer_weights, votes=votes)
    if warm_start and not (Path(warm_start) / "settings.json").is_file():
        raise UserError(f"--warm-start {warm_start} is not an experiment folder (no settings.json); "
                        f"pass results/<name>")
    trials, notes = [], []
    if warm_start:
        trials, note = earlier_trials(Path(warm_start), space, space_name, current)
        notes.append(note)
    configs = known_good(space_name, space) if use_known_good else []
    if configs:
        notes.append(f"known-good: the first {len(configs)} trials are this space's known-good configurations "
                     f"(search/tuning/warm_start.py says where each comes from; --no-known-good to skip them)")
    return StudySeed(trials, configs, notes)


def prepared_storage(experiment_dir: Path, seed: StudySeed, direction: str = "maximize"):
    """The experiment's Optuna storage (`optuna.db`, see `search.tuning.study`) holding the study Ray's OptunaSearch
    will load, with `seed`'s earlier trials added and its known-good configurations enqueued."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # Tune's table reports the trials
    storage = open_storage(experiment_dir)
    study = optuna.create_study(storage=storage, study_name=STUDY_NAME, direction=direction)
    study.add_trials(seed.trials)
    for params in seed.enqueued:
        study.enqueue_trial(params)
    return storage
