"""`search.serving.faces`: the crop of a detected box keeps FER2013's framing (the box grown by CROP_MARGIN)."""
from __future__ import annotations

import cv2
import numpy as np

from search.serving.deploy import CROP_MARGIN
from search.serving.faces import crop_face
from trainables.data import make_demo


def test_crop_is_the_fer2013_crop():
    """Cutting the box of a pasted face back out gives the face again (the crop keeps FER2013's framing)."""
    face = make_demo(n_train=7, n_val=7).train.x[0].numpy()
    canvas = np.full((400, 400), 90, np.uint8)
    canvas[100:292, 100:292] = cv2.resize(face, (192, 192), interpolation=cv2.INTER_CUBIC)
    side = 192 / (1 + 2 * CROP_MARGIN)
    box = (round(196 - side / 2), round(196 - side / 2), round(side), round(side))
    crop = crop_face(canvas, box)
    assert crop.shape == (48, 48) and np.abs(crop.astype(int) - face).mean() < 4
