"""search.predict's face detection: real FER2013 faces pasted on a textured photo and into a short video, each
found once where it was pasted, The only predict tests that need
real faces (the bundled Haar cascade does not fire on the demo data's cartoon faces)."""
from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest

import search.predict
from search.serving.faces import HaarDetector
from tests.helpers import SHARED_FER, as_command, predictor_weights, well_formed

predict_main = as_command(search.predict.main)

FACE_SIDE = 150


@pytest.fixture(scope="module")
def faces():
    """Real FER2013 Training faces (uint8 48x48); the tests never need PrivateTest."""
    npz = SHARED_FER / "fer2013.npz"
    if not npz.exists():
        pytest.skip(f"real FER2013 not found at {SHARED_FER} (see its README)")
    with np.load(npz) as d:
        return d["pixels"][:400].copy()


@pytest.fixture(scope="module")
def found(faces):
    """Faces the bundled Haar cascade finds alone on a plain background (it misses about 1 in 4 FER2013 faces)."""
    detector = HaarDetector()
    keep = []
    for face in faces[:60]:
        canvas = np.full((2 * FACE_SIDE, 2 * FACE_SIDE, 3), 110, np.uint8)
        canvas[FACE_SIDE // 2:FACE_SIDE // 2 + FACE_SIDE, FACE_SIDE // 2:FACE_SIDE // 2 + FACE_SIDE] = _big(face)
        if len(detector(canvas)) == 1:
            keep.append(face)
    assert len(keep) >= 30  # measured: 44 of these 60
    return keep


def _big(face: np.ndarray, side: int = FACE_SIDE) -> np.ndarray:
    return cv2.resize(face, (side, side), interpolation=cv2.INTER_CUBIC)[..., None]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return predictor_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def photo(found, tmp_path_factory):
    """A 900x600 textured background with 5 faces (150-190 px) at known places; returns (path, boxes).

    Each place gets the next face the detector finds there when it is alone, so the test is
    of finding them together, cropping and writing, not of the cascade's recall."""
    rng = np.random.default_rng(3)
    background = cv2.GaussianBlur((rng.normal(120, 25, (600, 900, 3)).clip(0, 255)).astype(np.uint8), (0, 0), 3)
    image, detector, pool = background.copy(), HaarDetector(), iter(found)
    places = [(30, 40, 150), (300, 60, 170), (620, 30, 190), (120, 380, 160), (560, 360, 180)]
    for x, y, side in places:
        for face in pool:
            alone = background.copy()
            alone[y:y + side, x:x + side] = _big(face, side)
            if len(detector(alone)) == 1:
                image[y:y + side, x:x + side] = _big(face, side)
                break
    path = tmp_path_factory.mktemp("photo") / "group.jpg"
    cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
    return path, places


def _iou(a, b) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    w = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    h = max(0, min(ay + ah, by + bh) - max(ay, by))
    return w * h / (aw * ah + bw * bh - w * h)


def test_photo_with_several_faces(photo, weights, tmp_path, capsys):
    path, places = photo
    assert predict_main(["--model", str(weights), str(path), "--out", str(tmp_path)]) == 0
    df = pd.read_csv(tmp_path / "predictions.csv")
    assert len(df) == len(places) and (df["file"] == str(path)).all() and df["frame"].isna().all()
    for x, y, side in places:  # every pasted face found once, where it was pasted
        best = max(_iou((x, y, side, side), box) for box in df[["x", "y", "width", "height"]].to_numpy())
        assert best > 0.6, (x, y, side, df)
    well_formed(df)
    annotated = cv2.imread(str(tmp_path / "annotated" / "group.jpg"))
    original = cv2.imread(str(path))
    assert annotated.shape == original.shape and np.abs(annotated.astype(int) - original).mean() > 1
    out = capsys.readouterr().out
    assert "5 faces in 1 inputs" in out
    counts = df["emotion"].value_counts()
    assert "faces per emotion: " + ", ".join(f"{e} {n}" for e, n in counts.items()) in out
    # the same photo as a gray PNG: the same faces
    gray = tmp_path / "gray.png"
    cv2.imwrite(str(gray), cv2.cvtColor(original, cv2.COLOR_BGR2GRAY))
    assert predict_main(["--model", str(weights), str(gray), "--out", str(tmp_path / "g"), "--no-annotate"]) == 0
    assert len(pd.read_csv(tmp_path / "g" / "predictions.csv")) == len(places)


def test_video_every_other_frame(found, weights, tmp_path):
    """8 frames with 2 faces moving right; --every 2 looks at frames 0, 2, 4, 6."""
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (640, 320))
    for t in range(8):
        frame = np.full((320, 640, 3), 100, np.uint8)
        for k, face in enumerate(found[5:7]):
            x = 20 + 320 * k + 8 * t
            frame[60:60 + FACE_SIDE, x:x + FACE_SIDE] = _big(face)
        writer.write(frame)
    writer.release()
    assert predict_main(["--model", str(weights), str(video), "--every", "2", "--out", str(tmp_path / "o")]) == 0
    df = pd.read_csv(tmp_path / "o" / "predictions.csv")
    assert df["frame"].tolist() == [0, 0, 2, 2, 4, 4, 6, 6] and df["face"].tolist() == [0, 1] * 4
    assert (df["x"].to_numpy()[::2] < 320).all() and (df["x"].to_numpy()[1::2] > 320).all()
    well_formed(df)
    cap = cv2.VideoCapture(str(tmp_path / "o" / "annotated" / "clip.avi.mp4"))
    frames = 0
    while cap.read()[0]:
        frames += 1
    assert frames == 4
