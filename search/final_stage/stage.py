"""The final stage: retrain the best configurations, evaluate them once on PrivateTest.

Reads top to bottom: pick the top-k configurations of the search by PublicTest
accuracy; load the data with all three splits (this stage and `search.evaluate`
are the only readers of PrivateTest); retrain each configuration from scratch on
the full Training split with several seeds, in parallel as Ray tasks that see only
Training and PublicTest and keep their best PublicTest epoch; save the weights;
with --distill (the default) teach the exported ensemble to one student network
(`search.final_stage.student`); then score every run, the per-configuration mean and spread,
two ensembles and the student on PrivateTest, once per test-time augmentation, and write
tables and pictures under `results/<name>/final/`. `search.run` calls `run_final` after the
search, `search.final` alone.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Sequence

from search.final_stage.analysis import write_audit, write_error_analysis, write_visualisations
from search.final_stage.candidates import select_candidates
from search.final_stage.labels import AUDIT_FILES
from search.final_stage.outputs import print_table, write_exports, write_readme
from search.final_stage.retrain import FinalRun, load_final_data, ray_for, retrain_all, without_test
from search.final_stage.scoring import (
    ANALYSIS_TTA,
    choose_analysed,
    metrics_table,
    per_class_table,
    predict_runs,
    score_models,
)
from search.final_stage.student import plan_student, start_state, student_data
from search.tuning.budget import Clock, TimeSplit, fit_final_to_budget
from search.tuning.records import TrialRecord
from search.tuning.settings import Settings
from trainables.data import FERData
from trainables.device import pick_device
from trainables.distill import student_epochs
from trainables.errors import UserError
from trainables.files import write_csv

FINAL_DIR = "final"


def clear_outputs(out: Path) -> None:
    """Remove the weights, exports and TensorBoard runs of an earlier final stage, and its label audit (this one
    may have no FER+ votes to audit with), so no stale output is left behind."""
    for sub in ("models", "tensorboard", "export"):
        shutil.rmtree(out / sub, ignore_errors=True)
    for name in AUDIT_FILES:
        (out / name).unlink(missing_ok=True)


def run_final(settings: Settings, trials: Sequence[TrialRecord], *, clock: Clock | None = None,
              split: TimeSplit | None = None) -> Path:
    """Retrain the top configurations of `trials` and evaluate them on PrivateTest; returns the output folder.

    Each TTA mode in `settings.final_tta` gets its own rows. With `clock` (--time-budget) the
    stage is cut to the time left and every run stops after the last epoch that fits.
    """
    s = settings
    out = s.experiment_dir / FINAL_DIR
    # Under a time budget every finished trial is a candidate: when one epoch of the best does not fit,
    # the plan falls back to the next that does (fit_final_to_budget).
    candidates = select_candidates(trials, len(trials) if clock else s.final_top_k)
    if not candidates:
        raise UserError(f"no trial of {s.experiment_dir} has a PublicTest accuracy (errored and diverged trials "
                        f"do not count, nor trials over --max-latency-ms, which are not trained); finish at least "
                        f"one epoch of the search (--resume) first")
    start = time.perf_counter()
    data = load_final_data(s)  # before any training: a bad PrivateTest fails now, not after hours
    ttas = [ANALYSIS_TTA, *dict.fromkeys(t for t in s.final_tta if t != ANALYSIS_TTA)]  # the analysis needs "none"
    deadline = student_deadline = None
    epochs = s.final_epochs or s.max_epochs
    distill_epochs = student_epochs(epochs)
    if clock:
        s, plan, deadline, skip = fit_final_to_budget(s, trials, [c.trial_id for c in candidates], clock, data,
                                                      ttas, split)
        candidates = candidates[skip:skip + s.final_top_k]
        epochs, distill_epochs = s.final_epochs, plan.student_epochs
        student_deadline = clock.deadline - plan.eval_seconds
    voted = [c.name for c in candidates if c.config.ferplus_votes]
    if voted and data.train.votes is None:
        raise UserError(f"{', '.join(voted)} trained on FER+ votes (ferplus_votes), which {s.data} does not have: "
                        f"put Microsoft's fer2013new.csv beside it or pass --ferplus")
    # --ema-fraction: the search's (each trial's config holds it) unless search.final was given another.
    candidates = [dataclasses.replace(c, config=dataclasses.replace(c.config, ema_fraction=s.ema_fraction))
                  for c in candidates]
    if any(c.rank != i or c.near_copy_of for i, c in enumerate(candidates, start=1)):
        print("final stage: configurations " + ", ".join(
            c.name + (f" (a near copy of {c.near_copy_of}: the search found nothing else)" if c.near_copy_of else "")
            for c in candidates) + "; near copies of a better one are passed over", flush=True)
    clear_outputs(out)
    with ray_for(s):
        runs = retrain_all(s, data, candidates, epochs=epochs, out=out, ttas=ttas, deadline=deadline)
        if not runs:
            raise UserError("no final run has weights to evaluate (each diverged in its first epoch or started "
                            "after the time budget had ended)")
        student = distil(s, data, runs, epochs=distill_epochs, out=out, ttas=ttas, deadline=student_deadline)
    trained = time.perf_counter()
    probs = predict_runs(runs + ([student] if student else []), data, ttas=ttas, device=pick_device())
    rows, full = score_models(runs, probs, data, ttas=ttas, beta=s.beta, student=student)
    table = metrics_table(rows, ttas)
    write_csv(table, out / "metrics.csv")
    write_csv(per_class_table(full), out / "per_class.csv")
    analysed = choose_analysed(full, runs, student)
    write_error_analysis(out, analysed, full, data, ttas)
    audit = write_audit(out, analysed, full, data)
    write_visualisations(out, runs, data)
    write_exports(out, runs, full, student)
    write_readme(out, s, analysed, epochs, ttas, test_name=data.test_name)
    print(f"\n{data.test_name} ({len(data.test)} images; {rows[0]['n_dup_training']} duplicated in Training, "
          f"{rows[0]['n_dup_publictest']} in PublicTest), "
          f"{len(runs)} runs, {time.perf_counter() - start:.0f} s (training {trained - start:.0f} s, "
          f"scoring and figures {time.perf_counter() - trained:.0f} s):")
    print_table(table)
    if audit:
        print(f"\n{audit} ({out / 'label_audit.csv'})")
    print(f"\nfinal results: {out} (error analysis of {analysed})")
    return out


def distil(s: Settings, data: FERData, runs: list[FinalRun], *, epochs: int, out: Path, ttas: list[str],
           deadline: float | None) -> FinalRun | None:
    """--distill: train the student of the exported ensemble (None without --distill, without an ensemble of two
    or more runs, or when the time budget left it no epoch)."""
    plan = plan_student(runs, data.val.y.numpy()) if s.distill and epochs > 0 else None
    if plan is None:
        if s.distill and len(runs) > 1 and epochs <= 0:
            print("final stage: no distilled student, the time budget left it no epoch", flush=True)
        return None
    print(f"final stage: distilling {', '.join(r.name for r in plan.teachers)} into one {plan.candidate.config.arch}"
          f" started from {plan.start.name} ({epochs} epochs on their softened Training probabilities)", flush=True)
    taught = student_data(plan, without_test(data), device=pick_device())
    got = retrain_all(s, taught, [plan.candidate], epochs=epochs, out=out, ttas=ttas, deadline=deadline,
                      seeds=[plan.start.seed], init_state=start_state(plan), cpus=-1, info=plan.info)
    return got[0] if got else None
