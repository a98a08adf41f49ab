"""Faces in photos and video frames: find them, and cut each into a 48x48 gray crop like FER2013's.

Detection is OpenCV's: its bundled frontal-face Haar cascade by default (it ships inside
`opencv-python-headless` 4.x, so nothing is downloaded), or the YuNet DNN detector
(`cv2.FaceDetectorYN`) when the user passes its ONNX file, which finds turned and small
faces the cascade misses. The crop is the detector's box grown by `CROP_MARGIN` on every
side, made square, padded by replicating the border where it leaves the picture, made gray
and resized with INTER_AREA (the resampling OpenCV recommends for shrinking).
"""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from search.serving.deploy import CROP_MARGIN, SIZE
from trainables.errors import UserError

Box = tuple[int, int, int, int]  # x, y, width, height in pixels of the full picture
HAAR_FILE = "haarcascade_frontalface_default.xml"
DETECT_SIDE = 1280  # a larger picture is searched at this longest side (boxes scaled back): same faces, far faster


class HaarDetector:
    """OpenCV's frontal-face Haar cascade on the gray picture, with OpenCV's default settings.

    Measured on 150 real FER2013 faces upscaled 3-6x on a plain gray background: found 117 with
    3 neighbours (OpenCV's default) against 104 with 5; the other bundled frontal cascades
    (alt, alt2) found 112-114; equalising the histogram first found fewer (82-93). No box fell
    outside a face.
    """

    name = "haar"

    def __init__(self, *, min_face: int = 40, scale_factor: float = 1.1, min_neighbors: int = 3) -> None:
        data = getattr(cv2, "data", None)
        if data is None or not hasattr(cv2, "CascadeClassifier"):
            raise UserError("this OpenCV has no Haar cascades (OpenCV 5 dropped them); install "
                            "'opencv-python-headless<5' or pass --detector with a YuNet .onnx file")
        self.cascade = cv2.CascadeClassifier(str(Path(data.haarcascades) / HAAR_FILE))
        if self.cascade.empty():
            raise UserError(f"OpenCV's {HAAR_FILE} could not be loaded from {data.haarcascades}")
        self.min_face, self.scale_factor, self.min_neighbors = min_face, scale_factor, min_neighbors

    def __call__(self, bgr: np.ndarray) -> list[Box]:
        gray, scale = _shrunk(to_gray(bgr))
        min_side = max(12, round(self.min_face * scale))
        boxes = self.cascade.detectMultiScale(gray, scaleFactor=self.scale_factor,
                                              minNeighbors=self.min_neighbors, minSize=(min_side, min_side))
        return _sorted([tuple(round(v / scale) for v in b) for b in np.asarray(boxes).reshape(-1, 4)])


class YuNetDetector:
    """OpenCV's YuNet face detector from the user's ONNX file (e.g. face_detection_yunet_2023mar.onnx)."""

    name = "yunet"

    def __init__(self, path: str | os.PathLike, *, min_face: int = 40, score: float = 0.7) -> None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"detector file {path} does not exist (pass YuNet's .onnx, e.g. from the OpenCV Zoo)")
        try:
            self.net = cv2.FaceDetectorYN.create(str(path), "", (320, 320), score_threshold=score)
        except cv2.error as err:
            raise UserError(f"cannot load {path} as a YuNet face detector ({str(err).strip()[:120]})") from None
        self.min_face = min_face

    def __call__(self, bgr: np.ndarray) -> list[Box]:
        small, scale = _shrunk(bgr)
        self.net.setInputSize((small.shape[1], small.shape[0]))
        _, faces = self.net.detect(small)
        boxes = [] if faces is None else [tuple(round(v / scale) for v in f[:4]) for f in faces]
        return _sorted([b for b in boxes if min(b[2], b[3]) >= self.min_face])


def quiet_opencv() -> None:
    """Silence OpenCV's and FFmpeg's own warnings on a damaged file (read when a file is opened, not at import):
    search.predict says what went wrong in one line of its own."""
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")


def make_detector(path: str | None, *, min_face: int = 40):
    """YuNet when given its model file, else the Haar cascade."""
    return YuNetDetector(path, min_face=min_face) if path else HaarDetector(min_face=min_face)


def _shrunk(image: np.ndarray) -> tuple[np.ndarray, float]:
    scale = min(1.0, DETECT_SIDE / max(image.shape[:2]))
    if scale == 1.0:
        return image, 1.0
    size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA), scale


def _sorted(boxes: list) -> list[Box]:
    """Left to right, then top to bottom: the order a reader names the faces in."""
    return sorted((tuple(int(v) for v in b) for b in boxes), key=lambda b: (b[0], b[1]))


def to_gray(image: np.ndarray) -> np.ndarray:
    """A gray uint8 picture from OpenCV's BGR, BGRA or gray."""
    if image.ndim == 2:
        return image
    code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
    return cv2.cvtColor(image, code)


def crop_face(gray: np.ndarray, box: Box, *, margin: float = CROP_MARGIN, size: int = SIZE) -> np.ndarray:
    """The square around `box` grown by `margin` of its side each way, border-replicated, resized to size x size."""
    x, y, w, h = box
    side = max(w, h) * (1 + 2 * margin)
    cx, cy = x + w / 2, y + h / 2
    x0, y0 = round(cx - side / 2), round(cy - side / 2)
    x1, y1 = x0 + round(side), y0 + round(side)
    pad = max(0, -x0, -y0, x1 - gray.shape[1], y1 - gray.shape[0])
    if pad:
        gray = cv2.copyMakeBorder(gray, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    crop = gray[y0 + pad:y1 + pad, x0 + pad:x1 + pad]
    return whole_crop(crop, size=size)


def whole_crop(gray: np.ndarray, *, size: int = SIZE) -> np.ndarray:
    """The whole gray picture as a size x size crop (already a face: a FER2013 image, or --no-detect)."""
    if gray.shape[:2] == (size, size):
        return np.ascontiguousarray(gray)
    shrinking = gray.shape[0] > size
    return cv2.resize(gray, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)
