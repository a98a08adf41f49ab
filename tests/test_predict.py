"""search.predict and search.export_model: faces in a synthetic photo and video made of real FER2013 faces,
48x48 crops, calibrated probabilities from weights, ONNX and TorchScript alike, and one line per bad input."""
from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

import search.export_model
import search.predict
from search.serving.deploy import CROP_MARGIN, Classifier, load_classifier
from search.serving.faces import HaarDetector, crop_face
from tests.helpers import SHARED_FER, as_command
from trainables.data.splits import EMOTIONS
from trainables.models import build_model
from trainables.weights import save_weights

export_main = as_command(search.export_model.main)
predict_main = as_command(search.predict.main)

TEMPERATURE = 2.0
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


def weights_file(folder):
    """A small ConvNet's weights file carrying a temperature, as the final stage writes it."""
    torch.manual_seed(0)
    model = build_model("convnet", num_classes=7, width=16, depth=2, dropout=0.0)
    return save_weights(folder / "run.pt", model.state_dict(), config={"width": 16, "depth": 2, "dropout": 0.0},
                        classes=EMOTIONS, info={"temperature": TEMPERATURE, "name": "run"})


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return weights_file(tmp_path_factory.mktemp("weights"))


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


def _well_formed(df: pd.DataFrame) -> None:
    probs = df[[f"p_{c}" for c in EMOTIONS]].to_numpy()
    assert np.allclose(probs.sum(1), 1, atol=1e-5) and (probs >= 0).all()
    assert (df["emotion"] == [EMOTIONS[i] for i in probs.argmax(1)]).all()
    assert np.allclose(df["probability"], probs.max(1))


def test_photo_with_several_faces(photo, weights, tmp_path, capsys):
    path, places = photo
    assert predict_main(["--model", str(weights), str(path), "--out", str(tmp_path)]) == 0
    df = pd.read_csv(tmp_path / "predictions.csv")
    assert len(df) == len(places) and (df["file"] == str(path)).all() and df["frame"].isna().all()
    for x, y, side in places:  # every pasted face found once, where it was pasted
        best = max(_iou((x, y, side, side), box) for box in df[["x", "y", "width", "height"]].to_numpy())
        assert best > 0.6, (x, y, side, df)
    _well_formed(df)
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


def test_probabilities_use_the_saved_temperature(found, weights, tmp_path):
    """A 48x48 picture is classified whole, and its probabilities are softmax(logits / T)."""
    crop = tmp_path / "face.png"
    cv2.imwrite(str(crop), found[0])
    assert predict_main(["--model", str(weights), str(crop), "--out", str(tmp_path / "out")]) == 0
    df = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert df[["x", "y", "width", "height"]].to_numpy().tolist() == [[0, 0, 48, 48]]
    model = build_model("convnet", num_classes=7, width=16, depth=2, dropout=0.0)
    model.load_state_dict(torch.load(weights, weights_only=True)["state_dict"])
    with torch.no_grad():
        logits = model.eval()((torch.from_numpy(found[0]).float()[None, None] / 255 - 0.5077) / 0.2551)
    row = df[[f"p_{c}" for c in EMOTIONS]].to_numpy()[0]
    assert np.allclose(row, (logits / TEMPERATURE).softmax(1).numpy()[0], atol=1e-5)
    assert not np.allclose(row, logits.softmax(1).numpy()[0], atol=1e-3)


def test_onnx_and_torchscript_predict_as_the_weights(photo, weights, tmp_path, capsys):
    path, _ = photo
    onnx_file, ts_file = tmp_path / "m.onnx", tmp_path / "m.torchscript.pt"
    assert export_main(["--model", str(weights), "--format", "onnx", "--out", str(onnx_file)]) == 0
    assert export_main(["--model", str(weights), "--format", "torchscript", "--out", str(ts_file)]) == 0
    assert "temperature 2.000" in capsys.readouterr().out
    tables = {}
    for name, model in (("weights", weights), ("onnx", onnx_file), ("torchscript", ts_file)):
        assert predict_main(["--model", str(model), str(path), "--out", str(tmp_path / name), "--no-annotate"]) == 0
        tables[name] = pd.read_csv(tmp_path / name / "predictions.csv")
        assert not (tmp_path / name / "annotated").exists()
    probs = [t[[f"p_{c}" for c in EMOTIONS]].to_numpy() for t in tables.values()]
    assert all(len(p) == 5 for p in probs)
    assert np.abs(probs[1] - probs[0]).max() < 1e-4 and np.abs(probs[2] - probs[0]).max() < 1e-4
    meta = load_classifier(onnx_file).meta
    assert meta["classes"] == list(EMOTIONS) and meta["temperature"] == TEMPERATURE
    assert meta["preprocessing"]["crop_margin"] == CROP_MARGIN and meta["preprocessing"]["size"] == 48


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
    _well_formed(df)
    cap = cv2.VideoCapture(str(tmp_path / "o" / "annotated" / "clip.avi.mp4"))
    frames = 0
    while cap.read()[0]:
        frames += 1
    assert frames == 4


def test_crop_is_the_fer2013_crop(faces):
    """Cutting the box of a pasted face back out gives the face again (the crop keeps FER2013's framing)."""
    face = faces[0]
    canvas = np.full((400, 400), 90, np.uint8)
    canvas[100:292, 100:292] = _big(face, 192)[..., 0]
    side = 192 / (1 + 2 * CROP_MARGIN)
    box = (round(196 - side / 2), round(196 - side / 2), round(side), round(side))
    crop = crop_face(canvas, box)
    assert crop.shape == (48, 48) and np.abs(crop.astype(int) - face).mean() < 4


def test_ensemble_export_is_the_mean_softmax_with_its_temperature(faces, tmp_path):
    """Two members: softmax(log(mean of softmaxes) / T), computed here by hand."""
    from trainables.calibration import apply_temperature

    members, paths = [], []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = build_model("convnet", num_classes=7, width=8, depth=2, dropout=0.0).eval()
        members.append(model)
        paths.append(str(save_weights(tmp_path / f"m{seed}", model.state_dict(),
                                      config={"width": 8, "depth": 2, "dropout": 0.0}, classes=EMOTIONS)))
    out = tmp_path / "ens.onnx"
    assert export_main(["--model", *paths, "--format", "onnx", "--out", str(out), "--temperature", "1.5"]) == 0
    x = faces[:32]
    with torch.no_grad():
        inputs = (torch.from_numpy(x).float()[:, None] / 255 - 0.5077) / 0.2551
        mean = torch.stack([m(inputs).softmax(1) for m in members]).mean(0).numpy()
    assert np.abs(load_classifier(out)(x) - apply_temperature(mean, 1.5)).max() < 1e-4
    assert isinstance(Classifier([members[0]]), torch.nn.Module)


# --------------------------------------------------------------------------- bad input

def _bad_files(tmp_path, weights):
    text = tmp_path / "notes.txt"
    text.write_text("not a picture")
    corrupt = tmp_path / "broken.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 20)
    fake_image = tmp_path / "fake.jpg"
    fake_image.write_bytes(b"GIF89a not really")
    return {"missing": str(tmp_path / "nope.jpg"), "not an image": str(text), "corrupt video": str(corrupt),
            "corrupt image": str(fake_image), "empty folder": str(tmp_path / "empty")}


@pytest.mark.parametrize("case", ["missing", "not an image", "corrupt video", "corrupt image", "empty folder"])
def test_bad_input_is_one_line_and_the_rest_is_kept(case, found, weights, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    bad = _bad_files(tmp_path, weights)[case]
    good = tmp_path / "face.png"
    cv2.imwrite(str(good), found[0])
    assert predict_main(["--model", str(weights), bad, str(good), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {bad}: ") and "Traceback" not in err[0], err
    assert len(pd.read_csv(tmp_path / "o" / "predictions.csv")) == 1  # the good picture's face is kept


def test_video_that_ends_early(found, weights, tmp_path, capsys):
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (320, 240))
    for _ in range(10):
        frame = np.full((240, 320, 3), 100, np.uint8)
        frame[40:190, 80:230] = _big(found[0])
        writer.write(frame)
    writer.release()
    data = video.read_bytes()
    video.write_bytes(data[: len(data) // 2])
    assert predict_main(["--model", str(weights), str(video), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ended early" in err[0] and "of its 10 frames" in err[0]
    assert 0 < len(pd.read_csv(tmp_path / "o" / "predictions.csv")) < 10  # the frames read are kept


def test_picture_without_a_face_exits_1(weights, tmp_path, capsys):
    blank = tmp_path / "wall.png"
    cv2.imwrite(str(blank), np.full((300, 400, 3), 200, np.uint8))
    assert predict_main(["--model", str(weights), str(blank), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: {blank}: no face found"]


@pytest.mark.parametrize("kind", ["not weights", "random bytes onnx", "missing model", "bad flag", "bad detector"])
def test_bad_model_or_flag_is_one_line(kind, found, tmp_path, capsys):
    face = tmp_path / "face.png"
    cv2.imwrite(str(face), found[0])
    model = tmp_path / "model.pt"
    args = ["--model", str(model), str(face), "--out", str(tmp_path / "o")]
    if kind == "not weights":
        torch.save({"optimizer": {}}, model)
    elif kind == "random bytes onnx":
        model = tmp_path / "model.onnx"
        model.write_bytes(bytes(range(256)) * 4)
        args[1] = str(model)
    elif kind == "bad flag":
        torch.save({"optimizer": {}}, model)
        args += ["--every", "0"]
    elif kind == "bad detector":
        model = weights_file(tmp_path)
        args[1] = str(model)
        (tmp_path / "yunet.onnx").write_bytes(bytes(range(256)) * 8)
        args += ["--detector", str(tmp_path / "yunet.onnx")]
    assert predict_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    assert not (tmp_path / "o" / "predictions.csv").exists()


# --------------------------------------------------------------------------- ONNX parity per family

@pytest.mark.parametrize("arch", ["convnet", "resnet18", "densenet121"])
def test_onnx_runtime_matches_pytorch_on_256_real_faces(arch, faces, tmp_path):
    """Every architecture family, exported with a sharpening temperature (0.1: an untrained network's logits are
    close together): max |difference| < 1e-4."""
    torch.manual_seed(0)
    model = build_model(arch, num_classes=7, width=16, depth=2, dropout=0.0)
    weights = save_weights(tmp_path / arch, model.state_dict(), config={"arch": arch, "width": 16, "depth": 2,
                                                                       "dropout": 0.0},
                           classes=EMOTIONS, info={"temperature": 0.1})
    out = tmp_path / f"{arch}.onnx"
    assert export_main(["--model", str(weights), "--format", "onnx", "--out", str(out)]) == 0
    x = faces[:256]
    reference = load_classifier(weights)(x)  # PyTorch eager, as search.predict runs weights
    exported = load_classifier(out)(x)
    assert exported.shape == (256, 7) and np.abs(exported - reference).max() < 1e-4
    assert reference.max(1).mean() > 1 / 7 + 0.02  # not a flat output that would match anything


def test_int8_export_agrees_with_the_float_model(faces, weights, tmp_path, capsys):
    out = tmp_path / "m.int8.onnx"
    assert export_main(["--model", str(weights), "--format", "onnx", "--int8", "--data", "demo",
                        "--out", str(out)]) == 0
    assert "in 8 bits" in capsys.readouterr().out
    small, exact = load_classifier(out), load_classifier(weights)
    assert small.meta["int8"] is True and small.meta["classes"] == list(EMOTIONS)
    a, b = small(faces[:256]), exact(faces[:256])
    assert np.allclose(a.sum(1), 1, atol=1e-4) and (a.argmax(1) == b.argmax(1)).mean() > 0.9
    assert export_main(["--model", str(weights), "--format", "onnx", "--int8"]) == 2  # no --data to calibrate
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --int8 needs")
