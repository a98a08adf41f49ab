"""`search.figures.plots`: first-layer kernels and per-emotion activation maps of every model family."""
from __future__ import annotations

import pytest

from trainables.data import make_demo


@pytest.mark.parametrize("arch", ["convnet", "resnet18", "densenet121"])
def test_kernels_and_activation_maps(tmp_path, arch, one_thread):
    from search.figures.plots import emotion_activations, plot_activations, plot_kernels
    from trainables.models import build_model

    demo = make_demo(n_train=70, n_val=70)
    model = build_model(arch, stem="stride").eval()
    faces, maps = emotion_activations(model, demo.val.x, demo.val.y, 7, per_class=4)
    assert faces.shape == maps.shape == (7, 48, 48)
    assert (maps >= 0).all() and (maps.reshape(7, -1).max(1) > 0).all()
    first = demo.val.x[demo.val.y == 0][:4].float().mean(0).numpy()
    assert faces[0] == pytest.approx(first)
    plot_kernels(model, tmp_path / "k.png")
    plot_activations(faces, maps, demo.classes, tmp_path / "a.png")
    assert (tmp_path / "k.png").stat().st_size > 1000 and (tmp_path / "a.png").stat().st_size > 1000
