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


# --------------------------------------------------------------------------- pictures as phones and cameras leave them

def _faces_found(weights, path, out, *extra) -> tuple[int, pd.DataFrame]:
    status = predict_main(["--model", str(weights), str(path), "--out", str(out), "--no-annotate", *extra])
    return status, pd.read_csv(out / "predictions.csv")


def test_a_portrait_stored_sideways_is_read_upright(photo, weights, tmp_path):
    """A phone stores a portrait as the sensor saw it, sideways, with an EXIF orientation tag (6: turn it 90
    degrees clockwise to show it); read upright, its faces are found where they are in the upright picture."""
    from PIL import Image

    path, places = photo
    upright = cv2.imread(str(path))
    sideways = cv2.rotate(upright, cv2.ROTATE_90_COUNTERCLOCKWISE)
    tagged, untagged = tmp_path / "portrait.jpg", tmp_path / "untagged.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(sideways[..., ::-1]).save(tagged, quality=95, exif=exif)
    Image.fromarray(sideways[..., ::-1]).save(untagged, quality=95)
    status, df = _faces_found(weights, tagged, tmp_path / "o")
    assert status == 0 and len(df) == len(places)
    for x, y, side in places:  # in the upright picture's pixels
        assert max(_iou((x, y, side, side), box) for box in df[["x", "y", "width", "height"]].to_numpy()) > 0.6
    # the same pixels without the tag: the upright-face detector misses the faces on their side
    status, df = _faces_found(weights, untagged, tmp_path / "u")
    assert len(df) < len(places) - 2


def test_a_large_picture_is_searched_at_1280_px_and_boxed_in_its_own_pixels(photo, weights, tmp_path):
    path, places = photo
    big = cv2.resize(cv2.imread(str(path)), None, fx=2.5, fy=2.5, interpolation=cv2.INTER_CUBIC)  # 2250 x 1500
    large = tmp_path / "large.png"
    cv2.imwrite(str(large), big)
    status, df = _faces_found(weights, large, tmp_path / "o")
    assert status == 0 and len(df) == len(places)
    for x, y, side in places:
        scaled = (2.5 * x, 2.5 * y, 2.5 * side, 2.5 * side)
        assert max(_iou(scaled, box) for box in df[["x", "y", "width", "height"]].to_numpy()) > 0.6


def test_min_face_leaves_out_smaller_faces(photo, weights, tmp_path, capsys):
    path, places = photo
    status, df = _faces_found(weights, path, tmp_path / "a", "--min-face", "100")
    assert status == 0 and len(df) == len(places)
    # the pasted faces are 150-190 px: the cascade's boxes run up to a third larger than the face, so at
    # --min-face 260 it can still box the largest; at 300 nothing that size is looked for, and the picture has no face
    status, df = _faces_found(weights, path, tmp_path / "c", "--min-face", "260")
    assert len(df) < len(places) and (df["width"] >= 260).all()
    status, df = _faces_found(weights, path, tmp_path / "b", "--min-face", "300")
    assert status == 1 and len(df) == 0 and f"warning: {path}: no face found" in capsys.readouterr().err


def test_a_folder_of_mixed_inputs(photo, found, weights, tmp_path):
    """A folder holding a photo, a face crop, a video and a text file, with a subfolder: every picture and video
    is read (the text file is not an input), each annotated copy under the folder's name."""
    path, places = photo
    folder = tmp_path / "album"
    (folder / "trip").mkdir(parents=True)
    cv2.imwrite(str(folder / "group.jpg"), cv2.imread(str(path)))
    cv2.imwrite(str(folder / "trip" / "crop.png"), found[0])
    (folder / "notes.txt").write_text("not a picture")
    writer = cv2.VideoWriter(str(folder / "trip" / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10, (640, 320))
    for _ in range(3):
        frame = np.full((320, 640, 3), 100, np.uint8)
        frame[60:60 + FACE_SIDE, 20:20 + FACE_SIDE] = _big(found[5])  # as test_video_every_other_frame's first
        writer.write(frame)
    writer.release()
    out = tmp_path / "o"
    assert predict_main(["--model", str(weights), str(folder), "--out", str(out)]) == 0
    df = pd.read_csv(out / "predictions.csv")
    per_file = df.groupby("file").size().to_dict()
    assert per_file == {str(folder / "group.jpg"): len(places), str(folder / "trip" / "clip.avi"): 3,
                        str(folder / "trip" / "crop.png"): 1}
    well_formed(df)
    for copy in ("group.jpg", "trip/crop.png", "trip/clip.avi.mp4"):
        assert (out / "annotated" / "album" / copy).is_file(), copy
