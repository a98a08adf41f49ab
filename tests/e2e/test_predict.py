"""search.predict and search.export_model on 48x48 crops (the demo data's, classified whole or with --no-detect):
calibrated probabilities from weights, ONNX and TorchScript alike, the int8 export, an ensemble's export, ONNX
parity for every family, and one line per bad input with the exit status the README gives. None of this needs
the real FER2013 (tests/e2e/test_predict_faces.py has the face detector's tests, which do)."""
from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

import search.export_model
import search.predict
from search.serving.deploy import CROP_MARGIN, Classifier, load_classifier
from tests.helpers import TEMPERATURE, as_command, predictor_weights, well_formed
from trainables.data import make_demo
from trainables.data.splits import EMOTIONS
from trainables.models import build_model
from trainables.weights import save_weights

export_main = as_command(search.export_model.main)
predict_main = as_command(search.predict.main)


@pytest.fixture(scope="module")
def crops():
    """The demo data's 48x48 faces (uint8): crops as a detector would hand them to the model."""
    return make_demo(n_train=300, n_val=7).train.x.numpy()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return predictor_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def crop_folder(crops, tmp_path_factory):
    """Five 48x48 pictures in a folder (classified whole: a 48x48 picture is taken as the face)."""
    folder = tmp_path_factory.mktemp("crops")
    for i in range(5):
        cv2.imwrite(str(folder / f"face{i}.png"), crops[i])
    return folder


def test_probabilities_use_the_saved_temperature(crops, weights, tmp_path):
    """A 48x48 picture is classified whole, and its probabilities are softmax(logits / T)."""
    crop = tmp_path / "face.png"
    cv2.imwrite(str(crop), crops[0])
    assert predict_main(["--model", str(weights), str(crop), "--out", str(tmp_path / "out")]) == 0
    df = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert df[["x", "y", "width", "height"]].to_numpy().tolist() == [[0, 0, 48, 48]]
    model = build_model("convnet", num_classes=7, width=16, depth=2, dropout=0.0)
    model.load_state_dict(torch.load(weights, weights_only=True)["state_dict"])
    with torch.no_grad():
        logits = model.eval()((torch.from_numpy(crops[0]).float()[None, None] / 255 - 0.5077) / 0.2551)
    row = df[[f"p_{c}" for c in EMOTIONS]].to_numpy()[0]
    assert np.allclose(row, (logits / TEMPERATURE).softmax(1).numpy()[0], atol=1e-5)
    assert not np.allclose(row, logits.softmax(1).numpy()[0], atol=1e-3)


def test_onnx_and_torchscript_predict_as_the_weights(crop_folder, weights, tmp_path, capsys):
    path = crop_folder
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


def test_ensemble_export_is_the_mean_softmax_with_its_temperature(crops, tmp_path):
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
    x = crops[:32]
    with torch.no_grad():
        inputs = (torch.from_numpy(x).float()[:, None] / 255 - 0.5077) / 0.2551
        mean = torch.stack([m(inputs).softmax(1) for m in members]).mean(0).numpy()
    assert np.abs(load_classifier(out)(x) - apply_temperature(mean, 1.5)).max() < 1e-4
    assert isinstance(Classifier([members[0]]), torch.nn.Module)


# --------------------------------------------------------------------------- bad input

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
def test_bad_input_is_one_line_and_the_rest_is_kept(case, crops, weights, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    bad = _bad_files(tmp_path, weights)[case]
    good = tmp_path / "face.png"
    cv2.imwrite(str(good), crops[0])
    assert predict_main(["--model", str(weights), bad, str(good), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {bad}: ") and "Traceback" not in err[0], err
    assert len(pd.read_csv(tmp_path / "o" / "predictions.csv")) == 1  # the good picture's face is kept


def test_video_that_ends_early(crops, weights, tmp_path, capsys):
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (320, 240))
    for _ in range(10):
        frame = np.full((240, 320, 3), 100, np.uint8)
        frame[40:190, 80:230] = cv2.resize(crops[0], (150, 150), interpolation=cv2.INTER_CUBIC)[..., None]
        writer.write(frame)
    writer.release()
    data = video.read_bytes()
    video.write_bytes(data[: len(data) // 2])
    assert predict_main(["--model", str(weights), str(video), "--no-detect", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ended early" in err[0] and "of its 10 frames" in err[0]
    assert 0 < len(pd.read_csv(tmp_path / "o" / "predictions.csv")) < 10  # the frames read are kept


def test_picture_without_a_face_exits_1(weights, tmp_path, capsys):
    blank = tmp_path / "wall.png"
    cv2.imwrite(str(blank), np.full((300, 400, 3), 200, np.uint8))
    assert predict_main(["--model", str(weights), str(blank), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: {blank}: no face found"]


def test_exit_status_precedence_and_complete_predictions(crops, weights, tmp_path, capsys):
    """An unreadable input outranks a faceless picture (2, not 1); either way every face found is written."""
    blank, good, broken = tmp_path / "wall.png", tmp_path / "face.png", tmp_path / "broken.jpg"
    cv2.imwrite(str(blank), np.full((300, 400, 3), 200, np.uint8))
    cv2.imwrite(str(good), crops[0])
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    inputs = [str(blank), str(broken), str(good)]
    assert predict_main(["--model", str(weights), *inputs, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: {blank}: no face found", err[1]] and err[1].startswith(f"error: {broken}: ")
    assert pd.read_csv(tmp_path / "a" / "predictions.csv")["file"].tolist() == [str(good)]
    # exit 1 (a faceless picture) with every other face written
    assert predict_main(["--model", str(weights), str(good), str(blank), str(good), "--out", str(tmp_path / "b")]) == 1
    assert pd.read_csv(tmp_path / "b" / "predictions.csv")["file"].tolist() == [str(good), str(good)]


def test_ctrl_c_keeps_the_predictions_made_so_far(crops, weights, tmp_path, monkeypatch, capsys):
    faces = []
    for i in range(4):
        faces.append(tmp_path / f"face{i}.png")
        cv2.imwrite(str(faces[-1]), crops[i])
    real = search.predict.predict_picture

    def interrupted(p, item, *args, **kwargs):
        if item.file == faces[2]:
            raise KeyboardInterrupt
        return real(p, item, *args, **kwargs)

    monkeypatch.setattr(search.predict, "predict_picture", interrupted)
    assert predict_main(["--model", str(weights), *map(str, faces), "--out", str(tmp_path / "o")]) == 130
    assert "interrupted" in capsys.readouterr().err
    df = pd.read_csv(tmp_path / "o" / "predictions.csv")
    assert df["file"].tolist() == [str(faces[0]), str(faces[1])]
    well_formed(df)


@pytest.mark.parametrize("kind", ["not weights", "random bytes onnx", "missing model", "bad flag", "bad detector"])
def test_bad_model_or_flag_is_one_line(kind, crops, tmp_path, capsys):
    face = tmp_path / "face.png"
    cv2.imwrite(str(face), crops[0])
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
        model = predictor_weights(tmp_path)
        args[1] = str(model)
        (tmp_path / "yunet.onnx").write_bytes(bytes(range(256)) * 8)
        args += ["--detector", str(tmp_path / "yunet.onnx")]
    assert predict_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    assert not (tmp_path / "o" / "predictions.csv").exists()


# --------------------------------------------------------------------------- ONNX parity per family

# --------------------------------------------------------------------------- ONNX parity per family

@pytest.mark.parametrize("arch", ["convnet", "resnet18", pytest.param("densenet121", marks=pytest.mark.slow)])
def test_onnx_runtime_matches_pytorch_on_256_faces(arch, crops, tmp_path):
    """Every architecture family, exported with a sharpening temperature (0.1: an untrained network's logits are
    close together): max |difference| < 1e-4."""
    torch.manual_seed(0)
    model = build_model(arch, num_classes=7, width=16, depth=2, dropout=0.0)
    weights = save_weights(tmp_path / arch, model.state_dict(), config={"arch": arch, "width": 16, "depth": 2,
                                                                       "dropout": 0.0},
                           classes=EMOTIONS, info={"temperature": 0.1})
    out = tmp_path / f"{arch}.onnx"
    assert export_main(["--model", str(weights), "--format", "onnx", "--out", str(out)]) == 0
    x = crops[:256]
    reference = load_classifier(weights)(x)  # PyTorch eager, as search.predict runs weights
    exported = load_classifier(out)(x)
    assert exported.shape == (256, 7) and np.abs(exported - reference).max() < 1e-4
    assert reference.max(1).mean() > 1 / 7 + 0.02  # not a flat output that would match anything


@pytest.fixture(scope="module")
def trained_weights(tmp_path_factory):
    """A ConvNet trained on the demo faces (about 10 s): an untrained network puts most faces in one class, so
    only trained weights show whether 8 bits keep what the network learned."""
    from trainables.runner import build_run, run_epoch

    torch.manual_seed(0)
    data = make_demo(splits=("Training", "PublicTest"))
    config = {"width": 16, "depth": 2, "dropout": 0.0, "optimizer": "adamw", "lr": 3e-3, "weight_decay": 1e-4,
              "schedule": "onecycle", "batch_size": 64, "augment": "flip_crop"}
    run = build_run(config, data, epochs=6, seed=0)
    for _ in range(6):
        metrics = run_epoch(run)
    assert metrics["val_acc"] > 0.6, metrics  # trained, far above chance (1/7)
    return save_weights(tmp_path_factory.mktemp("trained") / "run.pt", run.model.state_dict(), config=config,
                        classes=EMOTIONS, info={"temperature": 1.0, "name": "run"})


@pytest.mark.slow
def test_int8_export_keeps_a_trained_models_accuracy(trained_weights, tmp_path, capsys):
    """8 bits on trained weights, on the PublicTest crops --int8 calibrates on: accuracy within 1 point of float,
    the same top emotion for at least 95% of faces, and no emotion taking more than its float share + 3 points
    (a collapse to one class passes an agreement test on a model that already predicts that class)."""
    out = tmp_path / "trained.int8.onnx"
    assert export_main(["--model", str(trained_weights), "--format", "onnx", "--int8", "--data", "demo",
                        "--out", str(out)]) == 0
    assert "in 8 bits" in capsys.readouterr().out
    public = make_demo(splits=("PublicTest",)).splits["PublicTest"]
    x, y = public.x.numpy(), public.y.numpy()
    small, exact = load_classifier(out)(x), load_classifier(trained_weights)(x)
    acc_float, acc_int8 = (exact.argmax(1) == y).mean(), (small.argmax(1) == y).mean()
    assert acc_float > 0.6 and abs(acc_int8 - acc_float) <= 0.01, (acc_float, acc_int8)
    assert (small.argmax(1) == exact.argmax(1)).mean() >= 0.95
    shares = [np.bincount(p.argmax(1), minlength=7) / len(p) for p in (exact, small)]
    assert (shares[1] <= shares[0] + 0.03).all(), shares
    assert shares[0].max() < 0.5  # the float model itself spreads its answers over the emotions


def test_int8_export_agrees_with_the_float_model(crops, weights, tmp_path, capsys):
    out = tmp_path / "m.int8.onnx"
    assert export_main(["--model", str(weights), "--format", "onnx", "--int8", "--data", "demo",
                        "--out", str(out)]) == 0
    assert "in 8 bits" in capsys.readouterr().out
    small, exact = load_classifier(out), load_classifier(weights)
    assert small.meta["int8"] is True and small.meta["classes"] == list(EMOTIONS)
    a, b = small(crops[:256]), exact(crops[:256])
    assert np.allclose(a.sum(1), 1, atol=1e-4) and (a.argmax(1) == b.argmax(1)).mean() > 0.9
    assert export_main(["--model", str(weights), "--format", "onnx", "--int8"]) == 2  # no --data to calibrate
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --int8 needs")
