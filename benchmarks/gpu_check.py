"""GPU check: how many trials can share one GPU, measured with the project's own training loop.

`python benchmarks/gpu_check.py --data fer_subset.npz` trains, for each model (a ConvNet
and ResNet-18 with a stride-2 or a full-resolution stem) and each number N of concurrent
trials (1, 2, 4, 8), N worker processes at once, each one trial of the same config with its
own seed, for `--epochs` epochs through `build_run` / `run_epoch`: the same code a search
trial runs (bf16 autocast, channels-last and cudnn autotuning on CUDA). Each worker reports
its training images/s (the first epoch, with cudnn autotuning and allocator warm-up, apart
from the rest), its peak GPU memory and its final PublicTest accuracy; the table per
(model, N) goes to `results/benchmarks/gpu_check.csv`, with the speed-up of N trials
together over one trial alone, measured in the same command.

`python benchmarks/gpu_check.py --make-subset OUT.npz --data fer2013.csv --train-images 20000`
writes a small data file for a machine that cannot hold the whole data set: a class-stratified
sample of Training plus all of PublicTest (never PrivateTest), uint8, about 49 MiB for 20,000
Training images.

It needs only torch, numpy, pandas, kornia and the project's `trainables` package: no Ray,
no Optuna, no matplotlib. On a GPU machine without a package index, carry kornia's two
wheels (7 MB; `pip download kornia kornia_rs --no-deps --only-binary=:all: --python-version
3.12 --platform manylinux2014_x86_64 -d wheels/` on a connected machine) beside the subset
file (49 MiB) and `pip install --no-deps wheels/*.whl` there.
"""
from __future__ import annotations

import argparse
import os
import platform
import queue
import resource
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))



from search.tuning.cli import Parser, run_cli  # noqa: E402
from trainables.augment import POLICIES  # noqa: E402
from trainables.data import EMOTIONS, SEARCH_SPLITS, SPLITS, FERData, Split, load_fer2013, stratified_fraction  # noqa: E402
from trainables.device import autocast, pick_device  # noqa: E402
from trainables.errors import UserError  # noqa: E402
from trainables.files import atomic_path, write_csv  # noqa: E402
from trainables.runner import build_run, run_epoch  # noqa: E402

MIB = 2**20
# The models compared, by the name --models takes: configs for build_run (batch size and the
# rest of the optimisation are set from the flags, identically for every model).
MODELS: dict[str, dict] = {
    "convnet": {"arch": "convnet", "width": 64, "depth": 3},
    "resnet18-stride": {"arch": "resnet18", "stem": "stride"},
    "resnet18-keep": {"arch": "resnet18", "stem": "keep"},
}


# ---- data: the project's loader, or a small .npz subset ----

def _read_npz(path: Path) -> FERData:
    """Training and PublicTest from an .npz in the shared `fer2013.npz` layout (pixels, emotion, usage).

    That is the layout `--make-subset` writes; PrivateTest rows, where the file has them (the
    shared full copy), are dropped at once and never become a split.
    """
    try:
        with np.load(path, allow_pickle=False) as d:
            pixels, emotion, usage = d["pixels"], d["emotion"], d["usage"]
            names = [str(n) for n in d["usage_names"]] if "usage_names" in d else list(SPLITS)
            rows = d["rows"] if "rows" in d else np.arange(len(emotion))
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{path} is not a FER2013 .npz with pixels, emotion and usage arrays ({err}); "
                        f"write one with --make-subset") from err
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[1:] != (48, 48):
        raise UserError(f"{path}: pixels must be uint8 (N, 48, 48), got {pixels.dtype} {pixels.shape}")
    if not (len(pixels) == len(emotion) == len(usage) == len(rows)):
        raise UserError(f"{path}: pixels, emotion, usage and rows differ in length")
    if len(emotion) and (emotion.min() < 0 or emotion.max() >= len(EMOTIONS)):
        raise UserError(f"{path}: emotion labels must be in 0..{len(EMOTIONS) - 1}")
    splits = {}
    for name in SEARCH_SPLITS:
        keep = usage == names.index(name) if name in names else np.zeros(len(usage), bool)
        if not keep.any():
            raise UserError(f"{path} holds no {name} images")
        splits[name] = Split(torch.from_numpy(np.ascontiguousarray(pixels[keep])),
                             torch.from_numpy(emotion[keep].astype(np.int64)),
                             torch.from_numpy(rows[keep].astype(np.int64)))
    return FERData(EMOTIONS, splits, os.fspath(path))


def read_data(source: str, train_images: int, *, seed: int = 0) -> FERData:
    """Training (a stratified `train_images` sample when larger) and all of PublicTest from `source`.

    `source` is an .npz (see `_read_npz`) or anything `load_fer2013` reads: fer2013.csv, an
    image folder or "demo".
    """
    if train_images < 7:
        raise UserError(f"--train-images must be at least 7 (one per class), got {train_images}")
    path = Path(source).expanduser()
    data = _read_npz(path) if path.suffix == ".npz" and source != "demo" else load_fer2013(source, splits=SEARCH_SPLITS)
    if len(data.train) > train_images:
        train = stratified_fraction(data.train, train_images / len(data.train), seed=seed)
        data = FERData(data.classes, {"Training": train, "PublicTest": data.val}, data.source, data.test_name)
    return data


def make_subset(source: str, out: Path, train_images: int, *, seed: int = 0) -> dict:
    """Write `out`: a stratified `train_images` sample of Training and all of PublicTest, uint8, compressed.

    The arrays follow the shared fer2013.npz (pixels, emotion, usage, usage_names,
    emotion_names) plus `rows`, each image's row in the source CSV. Returns counts and size.
    """
    data = read_data(source, train_images, seed=seed)
    parts = [data.train, data.val]
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, open(tmp, "wb") as f:  # a file object: savez would append ".npz"
        np.savez_compressed(
            f,
            pixels=np.concatenate([p.x.numpy() for p in parts]).astype(np.uint8),
            emotion=np.concatenate([p.y.numpy() for p in parts]).astype(np.int64),
            usage=np.concatenate([np.full(len(p), i, np.int8) for i, p in enumerate(parts)]),
            rows=np.concatenate([p.rows.numpy() for p in parts]).astype(np.int64),
            usage_names=np.array(SEARCH_SPLITS),
            emotion_names=np.array(data.classes),
        )
    out.chmod(0o644)  # atomic_path's temporary file is private (0600); this one is meant to be copied
    return {"train": len(data.train), "public_test": len(data.val), "bytes": out.stat().st_size}


# ---- one worker: one trial, in its own process ----

def trial_config(model: str, a: argparse.Namespace) -> dict:
    """The build_run config of `model` under the optimisation flags shared by every model."""
    return {**MODELS[model], "batch_size": a.batch_size, "lr": a.lr, "optimizer": "sgd", "schedule": "cosine",
            "augment": a.augment}


def _worker(rank: int, job: dict, start, done, results) -> None:
    """Train one trial of `job` and put its measurements (or its error) on `results`.

    `start` and `done` are barriers shared by the job's workers: all trials begin training
    together, and on CUDA the device's memory use is read while every trial still holds its own.
    """
    out: dict = {"rank": rank}
    try:
        if job["device"] == "cpu":
            torch.set_num_threads(1)  # N trials share the cores, as Ray's CPU trials do
            device = torch.device("cpu")
        else:
            device = pick_device()  # CUDA with cudnn autotuning; pick_device("cuda") would not turn it on
        data = read_data(job["data"], job["train_images"])
        run = build_run(job["config"], data, epochs=job["epochs"], device=device, seed=job["seed"] + rank)
        with autocast(device):  # what train_one_epoch will use here: bf16 on CUDA (and some CPUs), else fp32
            out["precision"] = "bf16" if torch.is_autocast_enabled(device.type) else "fp32"
        out["ready"] = time.time()
        start.wait(timeout=job["wait_s"])
        out["began"] = time.time()
        epochs = [run_epoch(run) for _ in range(job["epochs"])]
        out.update(ended=time.time(), n_train=len(run.train), ips=[m["images_per_s"] for m in epochs],
                   val_acc=epochs[-1]["val_acc"], rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            out.update(alloc_mib=torch.cuda.max_memory_allocated(device) / MIB,
                       reserved_mib=torch.cuda.max_memory_reserved(device) / MIB,
                       hardware=f"{props.name} ({props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, "
                                f"CUDA {torch.version.cuda}")
            try:
                done.wait(timeout=job["wait_s"])  # every trial still holds its memory now
                free, total = torch.cuda.mem_get_info(device)
                out["device_used_mib"] = (total - free) / MIB
            except threading.BrokenBarrierError:
                pass  # another trial failed: this one's own figures still stand
        else:
            out["hardware"] = (f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), "
                               f"torch {torch.__version__}")
    except threading.BrokenBarrierError:
        out["error"] = "stopped: another trial of this configuration failed or timed out"
    except Exception as err:  # one failed configuration is a row of the table, not the end of the check
        out["error"] = f"{type(err).__name__}: {err}"
        start.abort()
        done.abort()
    results.put(out)


def run_config(model: str, n: int, a: argparse.Namespace, deadline: float) -> dict:
    """Train `n` trials of `model` at once, each in a spawned worker; returns the table's row."""
    ctx = torch.multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA
    job = {"device": a.device, "data": a.data, "train_images": a.train_images, "epochs": a.epochs,
           "config": trial_config(model, a), "seed": a.seed, "wait_s": max(30.0, deadline - time.time())}
    start, done, results = ctx.Barrier(n), ctx.Barrier(n), ctx.Queue()
    t0 = time.time()
    procs = [ctx.Process(target=_worker, args=(rank, job, start, done, results), daemon=True) for rank in range(n)]
    for p in procs:
        p.start()
    reports, note = [], ""
    while len(reports) < n:
        try:
            reports.append(results.get(timeout=1.0))
        except queue.Empty:
            if time.time() > deadline:
                note = "stopped at --time-limit"
                break
            if not any(p.is_alive() for p in procs) and results.empty():
                note = f"worker(s) ended without a report (exit codes {sorted({p.exitcode for p in procs})})"
                break
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():  # only past the deadline: this configuration's own workers
            p.kill()
            p.join()
    return summarize(model, n, a, reports, t0, time.time() - t0, note)


def _peak(values) -> float:
    """The largest of the values that were measured (None where not), NaN when none was."""
    measured = [v for v in values if v is not None]
    return max(measured) if measured else np.nan


def summarize(model: str, n: int, a: argparse.Namespace, reports: list[dict], t0: float, wall: float,
              note: str) -> dict:
    """The row of (model, n): images/s per trial and in total, memory and accuracy of the finished trials."""
    ok = [r for r in reports if "error" not in r]
    row: dict = {"model": model, "n_trials": n, "finished": len(ok), "epochs": a.epochs,
                 "batch_size": a.batch_size, "train_images": ok[0]["n_train"] if ok else np.nan}
    if ok:
        # The first epoch pays for cudnn autotuning and the allocator's growth; later ones are steady.
        steady = [r["ips"][1:] or r["ips"] for r in ok]
        per_trial = [len(s) / sum(1.0 / v for v in s) for s in steady]  # images / seconds over those epochs
        row.update(
            img_s_per_trial=float(np.mean(per_trial)), img_s_total=float(np.sum(per_trial)),
            img_s_first_epoch=float(np.mean([r["ips"][0] for r in ok])),
            peak_alloc_mib=_peak(r.get("alloc_mib") for r in ok),
            peak_reserved_mib=_peak(r.get("reserved_mib") for r in ok),
            device_used_mib=_peak(r.get("device_used_mib") for r in ok),
            peak_rss_mib=max(r["rss_mib"] for r in ok),
            val_acc_mean=float(np.mean([r["val_acc"] for r in ok])),
            val_acc_min=min(r["val_acc"] for r in ok), val_acc_max=max(r["val_acc"] for r in ok),
            setup_s=max(r["ready"] for r in ok) - t0,
            train_s=max(r["ended"] for r in ok) - min(r["began"] for r in ok),
            # a cross-check of img_s_total from the wall clock: every epoch, evaluation included
            img_s_total_wall=sum(len(r["ips"]) * r["n_train"] for r in ok)
            / (max(r["ended"] for r in ok) - min(r["began"] for r in ok)),
            precision=ok[0]["precision"], hardware=ok[0]["hardware"])
    errors = sorted({r["error"] for r in reports if "error" in r})
    row.update(wall_s=wall, note="; ".join(([note] if note else []) + errors))
    return row


def predict_seconds(rows: list[dict], model: str, n: int) -> float:
    """Seconds `n` trials of `model` should take, from its last finished configuration (0 when none).

    Cautious: the total throughput is assumed not to grow past what that configuration reached,
    so n trials take n / n_last times its training time, plus the same start-up.
    """
    done = [r for r in rows if r["model"] == model and r.get("finished") == r["n_trials"] and "train_s" in r]
    if not done:
        return 0.0
    last = done[-1]
    return last["setup_s"] + last["train_s"] * n / last["n_trials"] + 5.0


# ---- the command ----

def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python benchmarks/gpu_check.py", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True,
                   help="fer2013.csv, an image folder, 'demo', or an .npz in the fer2013.npz layout "
                        "(what --make-subset writes)")
    p.add_argument("--make-subset", metavar="OUT.npz",
                   help="write a stratified --train-images sample of Training plus all of PublicTest from --data "
                        "to OUT.npz (uint8, compressed) and exit")
    p.add_argument("--train-images", type=int, default=20000,
                   help="Training images, a class-stratified sample when --data holds more (default 20000)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the trials train (default auto: cuda when there is one)")
    p.add_argument("--models", nargs="+", default=list(MODELS), metavar="MODEL",
                   help=f"models to compare (default all: {' '.join(MODELS)})")
    p.add_argument("--n-trials", nargs="+", type=int, default=[1, 2, 4, 8], metavar="N",
                   help="numbers of trials trained at once on the one device (default 1 2 4 8)")
    p.add_argument("--epochs", type=int, default=3,
                   help="epochs per trial; the first is reported apart as warm-up (default 3)")
    p.add_argument("--batch-size", type=int, default=256, help="training batch size (default 256)")
    p.add_argument("--lr", type=float, default=0.1, help="peak SGD learning rate, cosine schedule (default 0.1)")
    p.add_argument("--augment", default="flip_crop",
                   help="augmentation policy (default flip_crop)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first trial; trial i uses seed + i (default 0)")
    p.add_argument("--time-limit", type=float, default=420.0,
                   help="seconds for the whole check: configurations that would end later are skipped, "
                        "and one still running then is stopped (default 420)")
    p.add_argument("--out", default="results/benchmarks/gpu_check.csv", help="output CSV")
    return p


def check_flags(a: argparse.Namespace) -> None:
    """Raise UserError for a flag a user got wrong; resolve --device auto."""
    unknown = [m for m in a.models if m not in MODELS]
    if unknown:
        raise UserError(f"unknown model '{unknown[0]}'; choose from {list(MODELS)}")
    if min(a.n_trials) < 1 or a.epochs < 1 or a.batch_size < 2 or a.time_limit <= 0:
        raise UserError("--n-trials and --epochs must be at least 1, --batch-size at least 2, --time-limit positive")
    if a.augment not in POLICIES:
        raise UserError(f"unknown augmentation policy '{a.augment}'; choose from {list(POLICIES)}")
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif a.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but torch sees no CUDA device; use --device cpu or auto")


COLUMNS = ["model", "n_trials", "finished", "precision", "img_s_per_trial", "img_s_total", "speedup",
           "img_s_first_epoch", "peak_alloc_mib", "peak_reserved_mib", "device_used_mib", "peak_rss_mib",
           "val_acc_mean", "setup_s", "wall_s", "note"]


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.make_subset:
        info = make_subset(a.data, Path(a.make_subset), a.train_images, seed=a.seed)
        print(f"wrote {a.make_subset}: {info['train']} Training + {info['public_test']} PublicTest images, "
              f"{info['bytes'] / MIB:.1f} MiB")
        return 0
    check_flags(a)
    started = time.time()
    deadline = started + a.time_limit
    data = read_data(a.data, a.train_images, seed=a.seed)  # fails early on bad data; warms a CSV's cache
    print(f"data: {len(data.train)} Training + {len(data.val)} PublicTest images from {a.data}; "
          f"device {a.device}; {a.epochs} epochs, batch {a.batch_size}")
    rows: list[dict] = []
    for model in dict.fromkeys(a.models):
        for n in sorted(set(a.n_trials)):
            left = deadline - time.time()
            predicted = predict_seconds(rows, model, n)
            if left <= 0 or predicted > left:
                note = f"skipped: {predicted:.0f} s predicted, {max(left, 0):.0f} s left of --time-limit"
                print(f"{model} x{n}: {note}")
                rows.append({"model": model, "n_trials": n, "finished": 0, "note": note})
                continue
            row = run_config(model, n, a, deadline)
            rows.append(row)
            print(f"{model} x{n}: {row.get('img_s_total', float('nan')):,.0f} img/s in total, "
                  f"{row['wall_s']:.0f} s{'; ' + row['note'] if row['note'] else ''}", flush=True)
    df = pd.DataFrame(rows)
    one = df[df["n_trials"] == 1].set_index("model").get("img_s_total", pd.Series(dtype=float))
    df["speedup"] = df.get("img_s_total", np.nan) / df["model"].map(one)  # n trials together vs one alone
    df.insert(2, "device", a.device)
    hardware = next((h for h in df.get("hardware", pd.Series(dtype=object)) if isinstance(h, str)), a.device)
    write_csv(df, a.out)
    print(f"\nhardware: {hardware}")
    shown = df[[c for c in COLUMNS if c in df]].dropna(axis=1, how="all")
    print(shown.to_string(index=False, float_format=lambda v: f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"))
    print(f"wrote {a.out}; elapsed {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
