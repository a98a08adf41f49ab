"""`--time-budget`: one deadline for the whole run (start-up, search and final stage together).

The clock starts when the command starts, so Ray's start-up and the data loading count.
While the search runs, `final_reserve` says how much of the budget the final stage needs,
from the per-epoch times the trials measured (scaled from the search's --train-fraction to
the full Training split) and capped at --final-share of the budget; the search stops when
only that much is left (`search_budget`, asked by the Tune stopper
`search.tuning.callbacks.BudgetStopper`). The final stage then sizes its configurations, seeds
and epochs to the time really left (`fit_final_to_budget`, `plan_final`), and every run stops
after the last epoch that still fits (the deadline it returns, which
`search.final_stage.retrain` enforces), so the command ends within the budget whatever the
machine. `TimeSplit` records how the time was spent. Everything about the budget is here.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from search.tuning.cluster import trial_resources
from search.tuning.console import plan_text
from search.tuning.records import TrialRecord
from search.tuning.settings import Settings
from trainables.distill import student_epochs
from trainables.errors import UserError
from trainables.files import write_text
from trainables.metrics import METRIC

if TYPE_CHECKING:
    from trainables.data import FERData

# Scoring every final run on PrivateTest and PublicTest, the error analysis and the figures:
# a fixed part (the figures, the tables, the ensembles) plus one forward pass per run, image
# and test-time augmentation, at inference speed. Measured on 2 CPU cores for 2 ConvNet runs
# with TTA none+flip: 6 s on the demo data (350 PrivateTest images).
EVAL_FIXED_SECONDS = 8.0
# The report written at the end (search.report): its imports, the search's figures and t-SNE
# are a fixed part; the model figures run each final run over PublicTest once, plus Grad-CAM
# (a forward and a backward pass) and the best run's features and channels, about four
# passes more. Measured on 2 CPU cores: 6-8 s on the demo data, 30 s on FER2013 with 2 ConvNet
# runs (3,589 PublicTest images, of which 8 s t-SNE of 2,000), which the per-image part covers.
REPORT_FIXED_SECONDS = 6.0
REPORT_PASSES = 4
# final/export/: the best run and the best ensemble written as ONNX (search.final_stage.outputs.write_exports).
# Measured on 2 CPU cores for demo ConvNets: 2.4 s for the first export (the exporter's imports),
# 1.2 s for a 2-member ensemble after it; a ResNet-18 member 3 s, a DenseNet-121 15 s (not reserved:
# the ConvNet figures are).
EXPORT_FIXED_SECONDS = 2.0
EXPORT_SECONDS_PER_MEMBER = 1.0
INFERENCE_SPEEDUP = 3.0  # a forward pass costs about a third of a training step (forward + backward)
RUN_START_SECONDS = 5.0   # a Ray task's start, the model's build and the data hand-off
EPOCH_SLACK = 0.15        # plan_final gives up at most this share of epochs for more runs
# --distill: the ensemble labels Training once (each member's pass, flip TTA, in bf16, as this share of a
# training epoch of its configuration), then the student trains alone (`trainables.distill.student_epochs`
# epochs, at a trial's speed: its extra threads are not counted on).
TEACHER_PASS_EPOCHS = 1.4
# From the search's stop to the final stage's plan: Tune stops the running trials, trials.csv is
# written and the three splits are loaded (measured: 4-6 s on 2 busy CPU cores).
STOP_SECONDS = 8.0


def command_started(argv: Sequence[str] | None) -> float:
    """When --time-budget starts counting for a command's `main(argv)`: the process's start when `argv` is None
    (the command line is this process's own, `python -m search.X`, imports included), else now (called from code)."""
    return process_started() if argv is None else time.time()


def process_started() -> float:
    """When this process started, as a `time.time()` value (its imports count against --time-budget too).

    Read from Linux's /proc (start time in clock ticks after boot); elsewhere, now.
    """
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return min(time.time(), boot + ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


@dataclass
class Clock:
    """The budget of one command: `total` seconds from `started` (a `time.time()` value)."""

    total: float
    started: float = field(default_factory=time.time)

    @property
    def deadline(self) -> float:
        return self.started + self.total

    def left(self) -> float:
        return self.deadline - time.time()

    def elapsed(self) -> float:
        return time.time() - self.started


@dataclass(frozen=True)
class FinalPlan:
    """What the final stage can afford: `top_k` configurations x `seeds` seeds x `epochs`, with the
    estimated seconds of their training and of the scoring after it."""

    top_k: int
    seeds: int
    epochs: int
    training_seconds: float
    eval_seconds: float
    student_epochs: int = 0        # --distill: the student's epochs (0: no student, one run has no ensemble)
    student_seconds: float = 0.0   # the teachers' pass over Training and the student's training

    @property
    def seconds(self) -> float:
        return self.training_seconds + self.student_seconds + self.eval_seconds

    @property
    def runs(self) -> int:
        return self.top_k * self.seeds


@dataclass(frozen=True)
class Measured:
    """What one trial's last epoch says about its speed: its objective, seconds and training images/s."""

    objective: float
    epoch_seconds: float
    images_per_s: float

    @classmethod
    def of(cls, trial: TrialRecord) -> "Measured":
        return cls(trial.objective, trial.epoch_seconds, trial.images_per_s)

    @classmethod
    def of_result(cls, result: dict) -> "Measured":
        """From one result a trial reported to Tune (its objective, `time_this_iter_s`, `images_per_s`); a trial
        not trained (over --max-latency-ms) measured nothing."""
        if result.get("over_latency"):
            return cls(math.nan, math.nan, math.nan)
        return cls(result.get(METRIC, math.nan), result.get("time_this_iter_s", math.nan),
                   result.get("images_per_s", math.nan))


def full_epoch_seconds(trial: Measured, n_search: int, n_full: int) -> float:
    """A trial's seconds per epoch on the full Training split, from its last measured epoch.

    The training part scales with the images (`n_search` in the search, `n_full` in the final
    stage); the rest of an epoch (PublicTest evaluation, reporting) does not.
    """
    epoch, speed = trial.epoch_seconds, trial.images_per_s
    if not (math.isfinite(epoch) and epoch > 0):
        return math.nan
    if not (math.isfinite(speed) and speed > 0):
        return epoch * n_full / max(1, n_search)
    train = n_search / speed
    return max(0.0, epoch - train) + n_full / speed


def eval_seconds(runs: int, epoch_seconds: float, n_full: int, n_test: int, ttas: int) -> float:
    """The reserve for scoring `runs` runs after training, exporting the best as ONNX and writing the report
    (see EVAL_FIXED_SECONDS, REPORT_FIXED_SECONDS and EXPORT_FIXED_SECONDS)."""
    per_image = epoch_seconds / max(1, n_full) / INFERENCE_SPEEDUP if math.isfinite(epoch_seconds) else 0.0
    scoring = runs * ttas * 2 * n_test * per_image  # PublicTest and PrivateTest
    report = REPORT_FIXED_SECONDS + (runs + REPORT_PASSES) * n_test * per_image
    # the best run, and at most every run as the ensemble (one run: the same file, copied)
    export = EXPORT_FIXED_SECONDS + EXPORT_SECONDS_PER_MEMBER * (1 + (runs if runs > 1 else 0))
    return EVAL_FIXED_SECONDS + scoring + report + export


def plan_seconds(epoch_seconds: Sequence[float], slots: int, seeds: int, epochs: int) -> float:
    """Training time of `len(epoch_seconds)` configurations x `seeds` runs of `epochs`, `slots` at once.

    Runs start in waves of `slots`; a wave lasts as long as its slowest run.
    """
    durations = sorted((t * epochs + RUN_START_SECONDS for t in epoch_seconds for _ in range(seeds)), reverse=True)
    return sum(max(durations[i:i + slots]) for i in range(0, len(durations), max(1, slots)))


def student_seconds(runs: int, epochs: int, best_epoch_seconds: float, slowest_epoch_seconds: float) -> float:
    """--distill after `runs` final runs of `epochs`: every run labels Training once (the ensemble of all of them
    at most), then the student, the best configuration, trains its epochs alone. 0 for one run (no ensemble)."""
    if runs < 2:
        return 0.0
    return (runs * TEACHER_PASS_EPOCHS * slowest_epoch_seconds + student_epochs(epochs) * best_epoch_seconds
            + RUN_START_SECONDS)


def plan_final(epoch_seconds: Sequence[float], *, slots: int, top_k: int, seeds: int, epochs: int,
               seconds: float, n_full: int, n_test: int, ttas: int, distill: bool = False) -> FinalPlan | None:
    """The largest final stage within `seconds`: most epochs first, then most runs, then most seeds.

    `epoch_seconds` are the full-data seconds per epoch of the candidates, best first. Epochs
    come first because one well-trained model is worth more than several short ones; within
    EPOCH_SLACK of the most epochs, more runs (the ensemble) win, which fills the parallel
    slots; at equal runs, more seeds of the best configurations before more configurations,
    so that the seed mean and spread are measured (a second seed of the best configuration
    is also the surer ensemble partner). None when not even one epoch of one run fits. With `distill`
    a plan of two or more runs also holds the student after them (`student_seconds`), scored with them.
    """
    times = [t if math.isfinite(t) else max((x for x in epoch_seconds if math.isfinite(x)), default=60.0)
             for t in epoch_seconds]
    options = []
    for k in range(1, min(top_k, len(times)) + 1):
        for n in range(1, seeds + 1):
            student = distill and k * n > 1
            reserve = eval_seconds(k * n + student, max(times[:k]), n_full, n_test, ttas)

            def extra(e: int) -> float:
                return student_seconds(k * n, e, times[0], max(times[:k])) if student else 0.0

            fits = [e for e in range(1, epochs + 1)
                    if plan_seconds(times[:k], slots, n, e) + extra(e) + reserve <= seconds]
            if fits:
                e = fits[-1]
                options.append(FinalPlan(top_k=k, seeds=n, epochs=e, eval_seconds=reserve,
                                         training_seconds=plan_seconds(times[:k], slots, n, e),
                                         student_epochs=student_epochs(e) if student else 0,
                                         student_seconds=extra(e)))
    if not options:
        return None
    most = max(p.epochs for p in options)
    # Within EPOCH_SLACK of the most epochs any plan affords, more runs (the ensemble) win.
    near = [p for p in options if p.epochs >= math.floor((1 - EPOCH_SLACK) * most)]
    return max(near, key=lambda p: (p.runs, p.seeds, p.epochs))


def final_reserve(trials: Sequence[Measured], *, clock: Clock, share: float, slots: int, top_k: int,
                  seeds: int, epochs: int, n_search: int, n_full: int, n_test: int, ttas: int,
                  distill: bool = False) -> float:
    """Seconds the search leaves for the final stage: what the wanted final stage needs at the
    measured speed of the best trials so far, at most `share` of the budget (all of that share
    while nothing is measured yet) but at least one epoch of the best configuration. When the
    wanted stage does not fit the share, only what the stage that fits it needs (`plan_final`
    within the share): the rest of the share goes to the search instead of idling after a wave."""
    cap = share * clock.total
    ranked = sorted((t for t in trials if math.isfinite(t.objective)), key=lambda t: -t.objective)[:top_k]
    times = [full_epoch_seconds(t, n_search, n_full) for t in ranked]
    times = [t for t in times if math.isfinite(t)]
    if not times:
        return cap + STOP_SECONDS
    runs = len(times) * seeds
    student = distill and runs > 1
    need = (plan_seconds(times, slots, seeds, epochs) + eval_seconds(runs + student, max(times), n_full, n_test, ttas)
            + (student_seconds(runs, epochs, times[0], max(times)) if student else 0.0))
    if need > cap:  # the wanted stage does not fit its share: reserve what the plan that fits will use
        plan = plan_final(times, slots=slots, top_k=top_k, seeds=seeds, epochs=epochs, seconds=cap,
                          n_full=n_full, n_test=n_test, ttas=ttas, distill=distill)
        if plan is not None:  # not the share's unused rest: whole runs come in waves, and that rest idled
            need = plan.seconds
    # Never less than one epoch of the best configuration, so a final stage always fits.
    least = plan_seconds(times[:1], slots, 1, 1) + eval_seconds(1, times[0], n_full, n_test, ttas)
    return max(least, min(cap, need)) + STOP_SECONDS


@dataclass
class TimeSplit:
    """How a budgeted run spent its time, written to `results/<name>/time_budget.json` and printed."""

    budget: float
    startup: float = 0.0
    search: float = 0.0
    final: float = 0.0
    final_reserved: float = 0.0
    plan: dict = field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.startup + self.search + self.final

    def line(self) -> str:
        plan = (f" ({plan_text(self.plan['top_k'], self.plan['seeds'], self.plan['epochs'])})"
                if self.plan else "")
        return (f"time budget {self.budget:.0f} s: start-up {self.startup:.0f} s, search {self.search:.0f} s, "
                f"final stage {self.final:.0f} s{plan}; total {self.total:.0f} s "
                f"({100 * self.total / self.budget:.1f}% of the budget)")

    def write(self, experiment_dir: Path) -> None:
        write_text(Path(experiment_dir) / "time_budget.json",
                   json.dumps({**asdict(self), "total": self.total}, indent=2))


@dataclass
class SearchBudget:
    """The budget as the search sees it: stop when only the final stage's reserve is left."""

    clock: Clock
    share: float            # the most of the budget the final stage may take
    slots: int              # final runs at once
    top_k: int
    seeds: int
    epochs: int
    n_search: int           # Training images of a trial
    n_full: int             # Training images of a final run
    n_test: int
    ttas: int
    stopped_at: float | None = None  # time.time() when the search was stopped for the final stage

    final: bool = True      # False (--no-final): the search may use the whole budget but its own stop
    distill: bool = False   # --distill: the final stage's reserve holds the student too

    def reserve(self, measured: Sequence[Measured]) -> float:
        if not self.final:
            return STOP_SECONDS
        return final_reserve(measured, clock=self.clock, share=self.share, slots=self.slots, top_k=self.top_k,
                             seeds=self.seeds, epochs=self.epochs, n_search=self.n_search, n_full=self.n_full,
                             n_test=self.n_test, ttas=self.ttas, distill=self.distill)

    def search_over(self, measured: Sequence[Measured]) -> bool:
        """Whether the search must stop now. Never before some trial has finished an epoch, unless only
        the stop's own seconds are left: with nothing measured there is nothing to retrain, and the
        whole --final-share reserved up front (0.97 of 1200 s) once stopped a search after 28 s, before
        any epoch ended, so that the final stage had no trial to start from."""
        if self.stopped_at is None:
            reserve = self.reserve(measured) if any(math.isfinite(m.objective) for m in measured) else STOP_SECONDS
            if self.clock.left() <= reserve:
                self.stopped_at = time.time()
        return self.stopped_at is not None


# The budget of the search this process is running. It lives here, not in the Tune stopper
# that reads it: Tune pickles the stopper with the experiment, and a resumed search brings
# back the old stopper, whose own deadline would be the first run's.
_ACTIVE: list[SearchBudget | None] = [None]


def set_active(budget: SearchBudget | None) -> None:
    _ACTIVE[0] = budget


def active() -> SearchBudget | None:
    return _ACTIVE[0]


def fit_final_to_budget(s: Settings, trials: Sequence[TrialRecord], candidate_ids: Sequence[str], clock: Clock,
                        data: FERData,
                        ttas: Sequence[str], split: TimeSplit | None) -> tuple[Settings, FinalPlan, float, int]:
    """The final stage's top-k, seeds and epochs cut to the time left, its plan (with the student's epochs under
    --distill), the deadline of its runs (the student's is the plan's `eval_seconds` before the budget's end),
    and how many of the best candidates it passes over.

    Sized from the per-epoch times the search measured for the trials `candidate_ids`, best first (see
    `plan_final`). When not one epoch of the best configuration fits, the next one whose epoch does
    is trained instead (a cheaper model beats no model), said in one line; a UserError when none fits.
    """
    import ray

    # Ray is running under search.run; search.final alone starts it only to retrain, so it counts
    # this machine's CPUs (a cluster's are known only once joined: one slot, the safe guess).
    cluster = (ray.cluster_resources() if ray.is_initialized()
               else {"CPU": 1 if s.address else (os.cpu_count() or 1)})
    _, slots = trial_resources(dataclasses.replace(s, num_samples=s.final_top_k * s.final_seeds), cluster)
    by_id = {t.trial_id: t for t in trials}
    n_search = round(len(data.train) * s.train_fraction)
    times = [full_epoch_seconds(Measured.of(by_id[tid]), n_search, len(data.train)) for tid in candidate_ids]
    left = clock.left()
    epochs = s.final_epochs or s.max_epochs
    for skip in range(len(times)):
        plan = plan_final(times[skip:], slots=slots, top_k=s.final_top_k, seeds=s.final_seeds, epochs=epochs,
                          seconds=left, n_full=len(data.train), n_test=len(data.test), ttas=len(ttas),
                          distill=s.distill)
        if plan is not None:
            break
    else:
        raise UserError(f"the time budget leaves {left:.0f} s for the final stage, not enough for one epoch of "
                        f"any of the {len(times)} best configurations (the fastest about "
                        f"{min((t for t in times if math.isfinite(t)), default=math.nan):.0f} s on the full "
                        f"Training split); the search's results are kept: run python -m search.final "
                        f"{s.experiment_dir} to finish without a budget")
    if skip:
        print(f"final stage within the time budget: one epoch of the best {skip} configuration(s) (about "
              f"{times[0]:.0f} s) does not fit the {left:.0f} s left; training from the search's number "
              f"{skip + 1} on (about {times[skip]:.0f} s per epoch)", flush=True)
    student = f", then the distilled student for {plan.student_epochs} epochs" if plan.student_epochs else ""
    print(f"final stage within the time budget: {left:.0f} s left, so {plan_text(plan.top_k, plan.seeds, plan.epochs)}"
          f"{student} ({slots} at once; estimated {plan.seconds:.0f} s; wanted {s.final_top_k} x {s.final_seeds} x "
          f"{epochs})", flush=True)
    if split:
        split.final_reserved, split.plan = left, {"top_k": plan.top_k, "seeds": plan.seeds, "epochs": plan.epochs,
                                                  "student_epochs": plan.student_epochs,
                                                  "estimated_seconds": round(plan.seconds, 1), "passed_over": skip}
    s = dataclasses.replace(s, final_top_k=plan.top_k, final_seeds=plan.seeds, final_epochs=plan.epochs)
    return s, plan, clock.deadline - plan.eval_seconds - plan.student_seconds, skip


def search_budget(s: Settings, clock: Clock, data: FERData, concurrent: int) -> SearchBudget:
    """What the search must leave for the final stage under --time-budget (all of it without a final stage)."""
    return SearchBudget(clock=clock, share=s.final_share, final=s.final, distill=s.distill, slots=concurrent,
                        top_k=s.final_top_k, seeds=s.final_seeds, epochs=s.final_epochs,
                        n_search=len(data.train), n_full=round(len(data.train) / s.train_fraction),
                        n_test=len(data.val), ttas=len(set(s.final_tta) | {"none"}))
