"""Models as users run them: 48x48 uint8 face crops in, calibrated probabilities out; ONNX and TorchScript files.

`Classifier` wraps one model or an ensemble with everything a crop needs on the way:
pixel scaling, FER2013's mean/std, the softmax (averaged over an ensemble's members) and
the temperature fitted on PublicTest (`trainables.calibration`). `search.predict`,
`search.export_model` and the final stage's `export/*.onnx` all run this one module, so
an exported file classifies exactly as the weights it came from. The files carry their
class names and preprocessing as metadata (ONNX `metadata_props`; a `metadata.json`
extra file in TorchScript archives), so a user of ONNX Runtime alone needs nothing else.
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from trainables.augment import MEAN, STD
from trainables.errors import UserError, first_line
from trainables.files import atomic_path
from trainables.weights import load_weights

FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
INPUT_NAME, OUTPUT_NAME = "pixels", "probs"
SIZE = 48
# How search.predict cuts a face from a photo so that it looks like a FER2013 crop: the
# detector's box grown by this fraction of its side on every side, then made square. FER2013's
# crops are tight: on 200 random Training faces upscaled 3-6x and pasted on a gray background,
# OpenCV's frontal Haar cascade found 155, its box a median 0.97 (mean 0.95, sd 0.16) of the
# crop's side, centred to within 1% (sd 6%); 1 / 0.96 = 1 + 2 x 0.02.
CROP_MARGIN = 0.02
_EPS = 1e-12
# The layers --int8 quantizes: everything up to the logits, so that consecutive layers stay in
# 8 bits (with only Conv/Gemm/MatMul, the ConvNet was no faster batched: a float hop around each
# ReLU and pooling), but not the softmax and temperature, so that probabilities keep their
# resolution and sum to 1 (quantized, they came in steps of 1/255).
QUANTIZED_OPS = ["Conv", "Gemm", "MatMul", "Relu", "MaxPool", "AveragePool", "GlobalAveragePool", "Add", "Concat",
                 "Flatten", "Reshape"]


class Classifier(nn.Module):
    """uint8 pixels (N, 48, 48) -> calibrated probabilities (N, C): one model, or the mean softmax of several.

    Probabilities are `softmax(log p / T)` with p the (mean) softmax: for one model that is
    `softmax(logits / T)`. Always fp32.
    """

    def __init__(self, members: Sequence[nn.Module], temperature: float = 1.0) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.register_buffer("inverse_temperature", torch.tensor(1.0 / float(temperature)))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels.float().unsqueeze(1) / 255.0 - MEAN) / STD
        if len(self.members) == 1:
            return (self.members[0](x).float() * self.inverse_temperature).softmax(1)
        probs = torch.stack([m(x).float().softmax(1) for m in self.members]).mean(0)
        return (probs.clamp_min(_EPS).log() * self.inverse_temperature).softmax(1)


def classifier_from_weights(paths: Sequence[str | os.PathLike], *, temperature: float | None = None,
                            device: torch.device | None = None) -> tuple[Classifier, dict]:
    """A `Classifier` of one weights file (its own temperature) or an ensemble (pass the ensemble's temperature).

    Returns it in eval mode and its metadata (classes, temperature, members, preprocessing...).
    """
    members, metas = [], []
    for path in paths:
        model, meta = load_weights(path, device=device)
        members.append(model)
        metas.append(meta)
    classes = metas[0]["classes"]
    if any(m["classes"] != classes for m in metas):
        raise UserError("the weights files of an ensemble must predict the same classes")
    calibrated = temperature is not None or (len(metas) == 1 and "temperature" in metas[0])
    if temperature is None:
        temperature = float(metas[0].get("temperature", 1.0)) if len(metas) == 1 else 1.0
    meta = describe(classes, temperature, members=[str(m.get("name", Path(p).stem)) for m, p in zip(metas, paths)],
                    configs=[m["config"] for m in metas],
                    val_acc=[m.get("val_acc") for m in metas], labels=metas[0].get("labels", "fer2013"),
                    calibrated=calibrated)
    return Classifier(members, temperature).to(device or torch.device("cpu")).eval(), meta


def describe(classes: Sequence[str], temperature: float, **extra: Any) -> dict:
    """The metadata an exported file carries: what goes in, what comes out, and how a face crop is made."""
    return {"classes": list(classes), "temperature": float(temperature),
            "input": f"{INPUT_NAME}: uint8 (N, {SIZE}, {SIZE}) grayscale face crops, pixel values 0..255",
            "output": f"{OUTPUT_NAME}: float32 (N, {len(classes)}) calibrated probabilities in 'classes' order",
            "preprocessing": {"size": SIZE, "gray": "OpenCV COLOR_BGR2GRAY", "resize": "OpenCV INTER_AREA",
                              "crop_margin": CROP_MARGIN, "mean": MEAN, "std": STD,
                              "inside_model": "pixels / 255, (x - mean) / std, softmax, temperature"},
            **extra}


# --------------------------------------------------------------------------- export

def export_onnx(classifier: Classifier, meta: dict, path: str | os.PathLike) -> Path:
    """Write `classifier` as one self-contained ONNX file (dynamic batch size) with `meta` as metadata_props."""
    import onnx

    path = Path(path)
    example = torch.zeros(2, SIZE, SIZE, dtype=torch.uint8)
    with warnings.catch_warnings():  # the exporter's own chatter (deprecations of torch internals)
        warnings.simplefilter("ignore")
        program = torch.onnx.export(classifier.cpu().eval(), (example,), dynamo=True, input_names=[INPUT_NAME],
                                    output_names=[OUTPUT_NAME], dynamic_shapes=({0: torch.export.Dim("batch")},),
                                    verbose=False)
    model = program.model_proto
    onnx.helper.set_model_props(model, {k: json.dumps(v) for k, v in meta.items()})
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp))
    return path


def quantize_onnx(src: str | os.PathLike, dst: str | os.PathLike, crops: np.ndarray) -> Path:
    """An 8-bit copy of the ONNX file `src` (ONNX Runtime's static quantization), calibrated on `crops`.

    Weights int8 per channel, activations uint8 with ranges observed on `crops` (uint8 face
    crops; PublicTest's, never PrivateTest's), in the QDQ format ONNX Runtime fuses into
    integer kernels. The metadata is carried over, with `int8` set.
    """
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Crops(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{INPUT_NAME: np.ascontiguousarray(crops[i:i + 64], dtype=np.uint8)}
                                 for i in range(0, len(crops), 64)])

        def get_next(self):
            return next(self.batches, None)

    dst = Path(dst)
    meta = {p.key: p.value for p in onnx.load(str(src), load_external_data=False).metadata_props}
    with tempfile.TemporaryDirectory() as work, atomic_path(dst) as tmp:
        pre = Path(work) / "pre.onnx"
        quant_pre_process(str(src), str(pre))  # shape inference + graph optimisation, as ORT advises
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_static(str(pre), str(Path(work) / "int8.onnx"), Crops(), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=QUANTIZED_OPS)
        model = onnx.load(str(Path(work) / "int8.onnx"))
        del model.metadata_props[:]
        onnx.helper.set_model_props(model, {**meta, "int8": "true"})
        onnx.save_model(model, str(tmp))
    return dst


def export_torchscript(classifier: Classifier, meta: dict, path: str | os.PathLike) -> Path:
    """Write `classifier` as a traced TorchScript archive with `metadata.json` inside."""
    path = Path(path)
    # TracerWarning on the 48x48 branch of FerNet (the input size is fixed), and PyTorch 2.10+ marks
    # TorchScript deprecated in favour of torch.export: said once in the README, not on every call
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(classifier.cpu().eval(), torch.zeros(2, SIZE, SIZE, dtype=torch.uint8))
        with atomic_path(path) as tmp:
            torch.jit.save(traced, str(tmp), _extra_files={"metadata.json": json.dumps(meta)})
    return path


def export(classifier: Classifier, meta: dict, path: str | os.PathLike, fmt: str) -> Path:
    """Write `classifier` in `fmt` ("onnx" or "torchscript")."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format '{fmt}'; choose from {list(FORMATS)}")
    return (export_onnx if fmt == "onnx" else export_torchscript)(classifier, meta, path)


# --------------------------------------------------------------------------- loading any of the three

class Loaded:
    """A classifier loaded from a weights file, an ONNX file or a TorchScript archive: crops -> probabilities."""

    def __init__(self, run, meta: dict, kind: str) -> None:
        self.run_batch, self.meta, self.kind = run, meta, kind  # run_batch: one call, no slicing
        self.classes: list[str] = list(meta["classes"])

    def __call__(self, crops: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """uint8 (N, 48, 48) -> float32 (N, C) probabilities."""
        crops = np.ascontiguousarray(crops, dtype=np.uint8)
        out = [self.run_batch(crops[i:i + batch_size]) for i in range(0, len(crops), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)


def _torch_runner(module: nn.Module):
    @torch.no_grad()
    def run(x: np.ndarray) -> np.ndarray:
        return module(torch.from_numpy(x)).numpy()
    return run


def load_classifier(path: str | os.PathLike, *, threads: int = 0) -> Loaded:
    """Open a model for `search.predict`: `.onnx` (ONNX Runtime), a TorchScript archive, or final-stage weights.

    Anything else is a UserError naming what was expected. `threads` > 0 caps ONNX Runtime's threads.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file {path} does not exist; pass a weights .pt from results/<name>/final/models/ "
                        f"or an exported .onnx")
    if path.suffix.lower() == ".onnx":
        return _load_onnx(path, threads)
    if zipfile.is_zipfile(path) and _is_torchscript(path):
        try:
            extra = {"metadata.json": ""}
            with warnings.catch_warnings():  # the deprecation of TorchScript (see export_torchscript)
                warnings.simplefilter("ignore", FutureWarning)
                module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
            return Loaded(_torch_runner(module.eval()), json.loads(extra["metadata.json"]), "torchscript")
        except Exception as err:  # torch raises many types for a damaged archive
            raise UserError(f"cannot read {path} as a TorchScript model from search.export_model "
                            f"({first_line(err, 120)})") from None
    classifier, meta = classifier_from_weights([path])
    return Loaded(_torch_runner(classifier), meta, "weights")


def _is_torchscript(path: Path) -> bool:
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


def _load_onnx(path: Path, threads: int) -> Loaded:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise UserError(f"cannot read {path} as an ONNX model ({first_line(err)})") from None
    props = session.get_modelmeta().custom_metadata_map
    if "classes" not in props:
        raise UserError(f"{path} is an ONNX model without class names in its metadata; export it with "
                        f"python -m search.export_model")
    meta = {k: json.loads(v) for k, v in props.items()}
    name = session.get_inputs()[0].name
    return Loaded(lambda x: session.run(None, {name: x})[0], meta, "onnx")
