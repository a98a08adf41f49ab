"""The distilled student (--distill): the final stage's ensemble taught to one network of the best run's shape.

After the final runs have trained, the stage's ensemble (of its two, those of two runs or more,
the better by PublicTest accuracy without TTA: the exported one unless that is a single run)
labels every Training image once (`trainables.distill`); the
student, the best single run's configuration, starts from that run's kept weights and trains
for a share of the final runs' epochs (`trainables.distill.student_epochs`) on those soft targets, at a tenth of the
configuration's peak rate on a cosine schedule without warm-up, keeping its best PublicTest epoch
like every run. It sees Training and PublicTest only; PrivateTest scores it once, with the rest.
It costs one model at inference, against the ensemble's two or more.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from search.final_stage.candidates import Candidate
from search.final_stage.retrain import FinalRun
from search.final_stage.scoring import ensemble_members, val_accuracy
from trainables.config import TrialConfig
from trainables.data import FERData
from trainables.distill import SOFT_WEIGHT, STUDENT_LR_SCALE, TEMPERATURE, distill_targets, teacher_probs
from trainables.weights import load_weights, read_weights

PREFIX = "distilled-"


@dataclass(frozen=True)
class Student:
    """What the student trains: its candidate (the best run's configuration as a fine-tune), the run it starts
    from, its teachers and the distillation's temperature and soft-target weight."""

    candidate: Candidate
    start: FinalRun
    teachers: list[FinalRun]
    temperature: float = TEMPERATURE
    weight: float = SOFT_WEIGHT

    @property
    def info(self) -> dict:
        """What its weights file records about how it was made."""
        return {"distilled_from": [r.name for r in self.teachers], "started_from": self.start.name,
                "distill_temperature": self.temperature, "distill_weight": self.weight}


def teachers_of(runs: Sequence[FinalRun], val_y: np.ndarray) -> list[FinalRun]:
    """The members of the teaching ensemble: of the stage's two ensembles those of two runs or more, the better by
    PublicTest accuracy without TTA (the first on a tie, as `outputs.write_exports` chooses); [] when neither is."""
    ensembles = [m for m in ensemble_members(runs).values() if len(m) > 1]
    return list(max(ensembles, key=lambda m: val_accuracy(m, val_y)[1])) if ensembles else []


def plan_student(runs: Sequence[FinalRun], val_y: np.ndarray, *, temperature: float = TEMPERATURE,
                 weight: float = SOFT_WEIGHT) -> Student | None:
    """The student of `runs`' ensemble, or None when there is no ensemble of two or more runs to distil."""
    teachers = teachers_of(runs, val_y)
    if not teachers:
        return None
    start = max(runs, key=lambda r: r.val_acc)  # the best single run, as the stage exports it
    # The teachers' probabilities are the soft targets (they learnt whatever FER+ votes they trained on).
    config: TrialConfig = dataclasses.replace(start.candidate.config, soft_labels=True, ferplus_votes=0.0,
                                              schedule="cosine", warmup_fraction=0.0,
                                              lr=start.lr * STUDENT_LR_SCALE, ema_fraction=0.0)
    candidate = dataclasses.replace(start.candidate, config=config, prefix=PREFIX)
    return Student(candidate=candidate, start=start, teachers=teachers, temperature=temperature, weight=weight)


def student_data(student: Student, data: FERData, device=None) -> FERData:
    """`data` whose Training split carries the teachers' soft targets (PublicTest as it is, no PrivateTest)."""
    models = [load_weights(r.weights, device=device)[0] for r in student.teachers]
    probs = teacher_probs(models, data.train.x, device=device)
    soft = distill_targets(probs, data.train.y.numpy(), temperature=student.temperature, weight=student.weight)
    splits = dict(data.splits)
    splits["Training"] = dataclasses.replace(data.train, soft=soft)
    return FERData(classes=data.classes, splits=splits, source=data.source, test_name=data.test_name)


def start_state(student: Student) -> dict:
    """The state_dict the student starts from: the best run's kept weights."""
    return read_weights(student.start.weights)["state_dict"]
