"""`python -m search.export_model --model <weights.pt> --format onnx|torchscript`: a portable model file.

The file takes uint8 48x48 gray face crops (any batch size) and returns calibrated
probabilities: pixel scaling, FER2013's normalisation, the softmax and the temperature the
final stage fitted on PublicTest are inside it (`search.serving.deploy.Classifier`), and its
metadata holds the class names and how to cut a face crop. Several `--model` files make one
ensemble (mean softmax; give its temperature from the final stage's metrics.csv with
`--temperature`). After writing, the file is loaded back (ONNX Runtime or TorchScript) and
its probabilities compared with PyTorch's on 64 fixed crops; the difference is printed.

`--int8 --data PATH` writes an 8-bit ONNX file instead (ONNX Runtime's static quantization,
activation ranges from 512 PublicTest crops of PATH), and prints both files' PublicTest
accuracy and how often their top emotions agree: it is faster on a CPU, a little less exact.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from search.serving.deploy import (
    FORMATS,
    SIZE,
    SUFFIXES,
    classifier_from_weights,
    export,
    load_classifier,
    quantize_onnx,
)
from search.tuning.cli import Parser, run_cli
from trainables.data import load_fer2013
from trainables.errors import UserError

CHECK_CROPS = 64


CALIBRATION_CROPS = 512


def default_path(weights: str, fmt: str, int8: bool = False) -> Path:
    """Beside the (first) weights file: `<stem>.onnx`, `<stem>.int8.onnx` or `<stem>.torchscript.pt`."""
    return Path(weights).with_name(Path(weights).stem + (".int8" if int8 else "") + SUFFIXES[fmt])


def build_parser() -> Parser:
    """The `python -m search.export_model` command line."""
    p = Parser(prog="python -m search.export_model",
               description="Write final-stage weights as an ONNX or TorchScript file that takes 48x48 uint8 face "
                           "crops and returns calibrated probabilities, with class names and preprocessing inside.")
    p.add_argument("--model", required=True, nargs="+", metavar="WEIGHTS",
                   help="results/<name>/final/models/<run>.pt; several files make one ensemble")
    p.add_argument("--format", required=True, choices=list(FORMATS), help="onnx (ONNX Runtime) or torchscript")
    p.add_argument("--out", default="", help="output file (default beside the weights: <run>.onnx or "
                                             "<run>.torchscript.pt)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="temperature to apply (default: the one saved with a single model's weights; 1 for an "
                        "ensemble, whose fitted value is in final/metrics.csv)")
    p.add_argument("--int8", action="store_true",
                   help="ONNX only: quantize to 8 bits (faster on CPUs), calibrated on PublicTest crops of --data")
    p.add_argument("--data", default="", help="with --int8: fer2013.csv, an image folder or 'demo' (only its "
                                              "PublicTest split is read)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, build the classifier, write and check the file; returns 0."""
    a = build_parser().parse_args(argv)
    if a.temperature < 0:
        raise UserError(f"--temperature must be positive, got {a.temperature}")
    if a.int8 and (a.format != "onnx" or not a.data):
        raise UserError("--int8 needs --format onnx and --data (its PublicTest crops calibrate the 8-bit ranges)")
    if a.data and not a.int8:
        raise UserError("--data is only read with --int8")
    classifier, meta = classifier_from_weights(a.model, temperature=a.temperature or None)
    out = Path(a.out) if a.out else default_path(a.model[0], a.format, a.int8)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name")
    if a.int8:
        return export_int8(classifier, meta, out, a.data)
    export(classifier, meta, out, a.format)
    crops = np.random.default_rng(0).integers(0, 256, (CHECK_CROPS, SIZE, SIZE), dtype=np.uint8)
    with torch.no_grad():
        expected = classifier(torch.from_numpy(crops)).numpy()
    diff = float(np.abs(load_classifier(out)(crops) - expected).max())
    print(f"{out}: {a.format}, {len(a.model)} model(s), classes {', '.join(meta['classes'])}, temperature "
          f"{meta['temperature']:.3f}; max |probability difference| from PyTorch on {CHECK_CROPS} crops: {diff:.1e}")
    return 0


def export_int8(classifier, meta: dict, out: Path, data_path: str) -> int:
    """Write the float ONNX file to a temporary folder, quantize it into `out`, compare both on PublicTest."""
    import tempfile

    public = load_fer2013(data_path, splits=("PublicTest",)).splits["PublicTest"]
    x, y = public.x.numpy(), public.y.numpy()
    with tempfile.TemporaryDirectory() as work:
        full = export(classifier, meta, Path(work) / "float.onnx", "onnx")
        quantize_onnx(full, out, x[:CALIBRATION_CROPS])
        exact = load_classifier(full)(x)
    small = load_classifier(out)(x)
    acc_float, acc_int8 = (exact.argmax(1) == y).mean(), (small.argmax(1) == y).mean()
    agree = (exact.argmax(1) == small.argmax(1)).mean()
    print(f"{out}: 8-bit onnx, {len(meta['members'])} model(s), temperature {meta['temperature']:.3f}; PublicTest "
          f"({len(y)} images) accuracy {acc_float:.4f} in float, {acc_int8:.4f} in 8 bits; same top emotion for "
          f"{agree:.1%}, max |probability difference| {np.abs(exact - small).max():.3f}")
    return 0



if __name__ == "__main__":
    sys.exit(run_cli(main))
