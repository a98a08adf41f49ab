"""`python -m search.predict --model <weights.pt|model.onnx> INPUT... [--out DIR]`: emotions of faces in pictures.

Reads top to bottom: open the model (final-stage weights, an exported ONNX file or a
TorchScript archive; `search.serving.deploy`), list the inputs (files, and the images and videos
inside folders), then per picture or every N-th video frame find the faces
(`search.serving.faces`), cut each like a FER2013 crop, and classify all of a picture's faces in
one batch with calibrated probabilities. Writes `predictions.csv` (one row per face) and an
annotated copy of each input (boxes and labels) under `--out`.

Pictures are read with their EXIF orientation applied (a phone portrait stored sideways is
searched upright). A 48x48 picture is already a face crop and is classified whole, as is every picture with
`--no-detect`. An input that cannot be read, a video that ends before its frame count, or a
picture with no face is one line on stderr, and the rest goes on; the exit status says what
happened: 0 every input gave predictions, 1 some picture had no face, 2 some input could not
be read in full (or a flag or the model was wrong), 2 also when both happened.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from search.serving.deploy import SIZE, Loaded, load_classifier
from search.serving.faces import Box, crop_face, make_detector, quiet_opencv, to_gray, whole_crop
from search.tuning.cli import Parser, run_cli
from search.tuning.console import is_terminal
from trainables.errors import UserError
from trainables.files import atomic_path, write_csv

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".pgm", ".ppm"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"}
PREDICTIONS = "predictions.csv"
ANNOTATED = "annotated"
# One colour per FER2013 emotion (BGR), in its class order; other label sets cycle through them.
COLOURS = [(60, 60, 230), (60, 160, 60), (180, 80, 160), (40, 200, 250), (200, 120, 40), (230, 200, 40),
           (170, 170, 170), (90, 90, 90)]


@dataclass
class Outcome:
    """What a run met: predicted rows, and the inputs that failed (unreadable) or had no face."""

    rows: list[dict] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    faceless: list[str] = field(default_factory=list)
    pictures: int = 0
    frames: int = 0

    def fail(self, name: str, reason: str) -> None:
        self.failed.append(name)
        tqdm.write(f"error: {name}: {reason}", file=sys.stderr)


@dataclass
class Predictor:
    """The model, the detector (None: classify whole pictures) and whether to draw annotated copies."""

    model: Loaded
    detector: object | None
    annotate: bool

    def faces(self, bgr: np.ndarray, *, whole: bool) -> tuple[list[Box], np.ndarray]:
        """The face boxes of a picture and their crops (N, 48, 48)."""
        gray = to_gray(bgr)
        if whole or self.detector is None:
            return [(0, 0, gray.shape[1], gray.shape[0])], whole_crop(gray)[None]
        boxes = self.detector(bgr)
        crops = np.stack([crop_face(gray, b) for b in boxes]) if boxes else np.zeros((0, SIZE, SIZE), np.uint8)
        return boxes, crops

    def rows(self, name: str, frame: int | None, boxes: list[Box], crops: np.ndarray) -> list[dict]:
        """One predictions.csv row per face."""
        if not len(crops):
            return []
        probs = self.model(crops)
        classes = self.model.classes
        out = []
        for i, (box, p) in enumerate(zip(boxes, probs)):
            top = int(p.argmax())
            out.append({"file": name, "frame": frame, "face": i, "x": box[0], "y": box[1], "width": box[2],
                        "height": box[3], "emotion": classes[top], "probability": float(p[top]),
                        **{f"p_{c}": float(v) for c, v in zip(classes, p)}})
        return out


def draw(bgr: np.ndarray, rows: Sequence[dict], classes: Sequence[str]) -> np.ndarray:
    """A copy of the picture with each face's box and 'emotion 87%' above it, in the emotion's colour."""
    out = bgr.copy()
    thick = max(1, round(max(out.shape[:2]) / 400))
    for r in rows:
        colour = COLOURS[list(classes).index(r["emotion"]) % len(COLOURS)]
        x, y, w, h = r["x"], r["y"], r["width"], r["height"]
        cv2.rectangle(out, (x, y), (x + w - 1, y + h - 1), colour, thick)
        label = f"{r['emotion']} {r['probability']:.0%}"
        scale = max(0.3, min(1.5, w / 160))
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
        top = y - th - base - 2 if y - th - base - 2 >= 0 else y + h  # above the box, or below at the top edge
        cv2.rectangle(out, (x, top), (x + tw + 2, top + th + base + 2), colour, -1)
        cv2.putText(out, label, (x + 1, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thick,
                    cv2.LINE_AA)
    return out


# --------------------------------------------------------------------------- inputs

@dataclass(frozen=True)
class Input:
    """One file to read: its path, its name in predictions.csv (as given), its annotated copy's relative path."""

    file: Path
    name: str
    copy: Path


def list_inputs(paths: Sequence[str], out: Outcome, skip: Path) -> Iterator[Input]:
    """Every input file; a folder gives its images and videos, sorted (none under `skip`, the output folder),
    their annotated copies under the folder's name."""
    taken: set[Path] = set()
    skip = skip.resolve()
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in
                           IMAGE_SUFFIXES | VIDEO_SUFFIXES and not p.resolve().is_relative_to(skip))
            if not files:
                out.fail(raw, "the folder holds no image or video")
            for p in files:
                yield Input(p, str(p), _unique(Path(path.resolve().name) / p.relative_to(path), taken))
        elif path.is_file():
            yield Input(path, raw, _unique(Path(path.name), taken))
        else:
            out.fail(raw, "no such file or folder")


def _unique(copy: Path, taken: set[Path]) -> Path:
    """`copy`, or `<stem>-2<suffix>`, `-3`... when two inputs share a name."""
    candidate, k = copy, 1
    while candidate in taken:
        k += 1
        candidate = copy.with_name(f"{copy.stem}-{k}{copy.suffix}")
    taken.add(candidate)
    return candidate


def predict_picture(p: Predictor, item: Input, out_dir: Path, result: Outcome, *, no_detect: bool) -> None:
    """Classify the faces of one picture (or the whole picture), write its annotated copy."""
    file, name = item.file, item.name
    # Not IMREAD_UNCHANGED, which ignores the EXIF orientation: a phone stores a portrait sideways with a tag
    # saying so, and the detectors look for upright faces. ANYDEPTH | ANYCOLOR applies the tag and keeps
    # 16 bits (stretched below) and gray.
    bgr = cv2.imread(str(file), cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    if bgr is None or bgr.size == 0:
        result.fail(name, "not an image OpenCV can read (jpg, png, webp, bmp, tiff)")
        return
    if bgr.dtype != np.uint8:  # 16-bit PNG/TIFF
        bgr = cv2.convertScaleAbs(bgr, alpha=255.0 / max(int(bgr.max()), 1))
    if bgr.ndim == 2 or bgr.shape[2] != 3:  # gray (or with alpha): the detectors and the drawing take BGR
        bgr = cv2.cvtColor(bgr, cv2.COLOR_GRAY2BGR if bgr.ndim == 2 else cv2.COLOR_BGRA2BGR)
    result.pictures += 1
    boxes, crops = p.faces(bgr, whole=no_detect or bgr.shape[:2] == (SIZE, SIZE))
    rows = p.rows(name, None, boxes, crops)
    if not rows:
        result.faceless.append(name)
        tqdm.write(f"warning: {name}: no face found", file=sys.stderr)
    result.rows.extend(rows)
    if p.annotate:
        # the same format as the input where OpenCV writes it, else PNG
        keep = file.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp", ".bmp")
        target = out_dir / ANNOTATED / (item.copy if keep else item.copy.with_name(item.copy.name + ".png"))
        ok, encoded = cv2.imencode(target.suffix, draw(bgr, rows, p.model.classes))
        if not ok:
            raise UserError(f"OpenCV cannot encode {target}")
        with atomic_path(target) as tmp:
            tmp.write_bytes(encoded.tobytes())


def predict_video(p: Predictor, item: Input, out_dir: Path, result: Outcome, *, every: int, no_detect: bool) -> None:
    """Classify the faces of every `every`-th frame; the annotated copy holds those frames (at fps / every)."""
    file, name = item.file, item.name
    cap = cv2.VideoCapture(str(file))
    if not cap.isOpened():
        result.fail(name, "not an image or a video OpenCV can read")
        return
    expected = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    writer, index, looked, before = None, 0, 0, len(result.rows)
    copy = item.copy if item.copy.suffix.lower() == ".mp4" else item.copy.with_name(item.copy.name + ".mp4")
    target = out_dir / ANNOTATED / copy
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            if index % every == 0:
                looked += 1
                boxes, crops = p.faces(frame, whole=no_detect)
                rows = p.rows(name, index, boxes, crops)
                result.rows.extend(rows)
                if p.annotate:
                    if writer is None:
                        target.parent.mkdir(parents=True, exist_ok=True)
                        writer = cv2.VideoWriter(str(target), cv2.VideoWriter_fourcc(*"mp4v"), max(fps / every, 1.0),
                                                 (frame.shape[1], frame.shape[0]))
                    writer.write(draw(frame, rows, p.model.classes))
            index += 1
    finally:
        cap.release()
        if writer is not None:
            writer.release()
    if index == 0:
        result.fail(name, "no frame could be read (not a video, or corrupt)")
    elif expected and index < expected:
        result.fail(name, f"the video ended early: {index} of its {expected} frames could be read "
                          f"(the faces of those are kept)")
    result.frames += looked
    if index and len(result.rows) == before:
        tqdm.write(f"warning: {name}: no face found in the {looked} frame(s) looked at", file=sys.stderr)


def predict_inputs(p: Predictor, inputs: Sequence[str], out_dir: Path, *, every: int, no_detect: bool) -> Outcome:
    """Every input in order; the predictions are written even when a later input fails or Ctrl-C stops the run."""
    result = Outcome()
    try:
        items = list(list_inputs(inputs, result, out_dir))
        # A bar of inputs on a terminal (stderr, beside the warnings, which tqdm prints above it); nothing
        # redrawn in a log.
        for item in tqdm(items, desc="inputs", unit="input", file=sys.stderr, disable=not is_terminal(sys.stderr),
                         leave=False, dynamic_ncols=True):
            suffix = item.file.suffix.lower()
            if suffix in IMAGE_SUFFIXES or (suffix not in VIDEO_SUFFIXES and cv2.haveImageReader(str(item.file))):
                predict_picture(p, item, out_dir, result, no_detect=no_detect)
            else:  # a video, or no known suffix and not an image: maybe a video
                predict_video(p, item, out_dir, result, every=every, no_detect=no_detect)
    finally:
        columns = ["file", "frame", "face", "x", "y", "width", "height", "emotion", "probability",
                   *[f"p_{c}" for c in p.model.classes]]
        table = pd.DataFrame(result.rows, columns=columns)
        table["frame"] = table["frame"].astype("Int64")  # blank for pictures
        write_csv(table, out_dir / PREDICTIONS)
    return result


# --------------------------------------------------------------------------- command line

def build_parser() -> Parser:
    """The `python -m search.predict` command line."""
    p = Parser(prog="python -m search.predict",
               description="Find the faces in photos and videos and classify each one's emotion with a trained "
                           "model; writes predictions.csv and annotated copies.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="images, videos, or folders of them")
    p.add_argument("--model", required=True,
                   help="results/<name>/final/models/<run>.pt, or a file from search.export_model (.onnx, "
                        ".torchscript.pt), e.g. results/<name>/final/export/best_single.onnx")
    p.add_argument("--out", default="predictions", help="folder for predictions.csv and annotated/ "
                                                        "(default ./predictions)")
    p.add_argument("--every", type=int, default=1, metavar="N", help="in videos, look at every N-th frame (default 1)")
    p.add_argument("--no-detect", action="store_true",
                   help="every picture is already a face crop: classify it whole (48x48 pictures always are)")
    p.add_argument("--detector", default="", metavar="YUNET_ONNX",
                   help="use OpenCV's YuNet face detector from this model file instead of the bundled Haar cascade")
    p.add_argument("--min-face", type=int, default=40, metavar="PIXELS", help="smallest face side to find (default 40)")
    p.add_argument("--no-annotate", action="store_true", help="write predictions.csv only")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, classify every input, print a summary; the exit status of the module docstring."""
    a = build_parser().parse_args(argv)
    if a.every < 1:
        raise UserError(f"--every must be at least 1, got {a.every}")
    if a.min_face < 12:
        raise UserError(f"--min-face must be at least 12 pixels, got {a.min_face}")
    quiet_opencv()
    model = load_classifier(a.model)
    detector = None if a.no_detect else make_detector(a.detector or None, min_face=a.min_face)
    out_dir = Path(a.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file, not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    calibrated = "calibrated" if model.meta.get("calibrated", True) else "not calibrated (no temperature saved)"
    print(f"{a.model} ({model.kind}, {len(model.classes)} classes, temperature "
          f"{model.meta.get('temperature', 1.0):.2f}, {calibrated}); detector: "
          f"{'none' if detector is None else detector.name}", flush=True)
    result = predict_inputs(Predictor(model, detector, not a.no_annotate), a.inputs, out_dir, every=a.every,
                            no_detect=a.no_detect)
    files = len({r["file"] for r in result.rows})
    trouble = (f"; {len(result.failed)} input(s) could not be read" if result.failed else "") + \
        (f"; no face in {len(result.faceless)} picture(s)" if result.faceless else "")
    print(f"{len(result.rows)} faces in {files} inputs ({result.pictures} pictures, {result.frames} video frames "
          f"looked at){trouble}; {out_dir / PREDICTIONS}" + ("" if a.no_annotate else f", {out_dir / ANNOTATED}/"))
    if result.rows:
        counts = pd.Series([r["emotion"] for r in result.rows]).value_counts()
        print("faces per emotion: " + ", ".join(f"{e} {n}" for e, n in counts.items()))
    if result.failed:  # each was one line on stderr as it happened
        return 2
    return 1 if result.faceless else 0



if __name__ == "__main__":
    sys.exit(run_cli(main))
