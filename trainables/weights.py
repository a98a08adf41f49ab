"""Weights files of trained models: `<name>.pt` (state_dict, config, classes) and `<name>.json` beside it.

The final stage writes them; `search.evaluate` and the final stage's pictures read them.
They load with `torch.load(..., weights_only=True)`: tensors and plain values only.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from trainables.config import TrialConfig, as_fractions
from trainables.errors import UserError, first_line
from trainables.files import atomic_path, write_text
from trainables.runner import model_from_config

WEIGHTS_KEYS = ("state_dict", "config", "classes", "num_classes")


def save_weights(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], *,
                 config: TrialConfig | Mapping[str, Any], classes: Sequence[str], info: dict | None = None) -> Path:
    """Write `<path>.pt` (state_dict, config, classes; loadable with weights_only=True) and `<path>.json`.

    `info` (seed, best epoch, PublicTest accuracy, history...) goes into both files;
    it must hold only JSON values. Returns the `.pt` path.
    """
    path = Path(path).with_suffix(".pt")
    meta = {"config": TrialConfig.of(config).to_dict(), "classes": list(classes), "num_classes": len(classes),
            **(info or {})}
    with atomic_path(path) as tmp:
        torch.save({"state_dict": {k: v.detach().cpu() for k, v in state_dict.items()}, **meta}, tmp)
    write_text(path.with_suffix(".json"), json.dumps(meta, indent=2, sort_keys=True, default=float) + "\n")
    return path


def read_weights(path: str | os.PathLike) -> dict:
    """Read a weights file safely (weights_only=True); any unreadable or foreign file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist; pass a .pt file from results/<name>/final/models/")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types here (pickle, zip, runtime): all mean "not our file"
        raise UserError(f"cannot read {path} as weights saved by search.final ({first_line(err)})") from None
    missing = [k for k in WEIGHTS_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f"{path} is not a weights file from search.final (missing {', '.join(missing)})")
    # An older file's schedule settings in epochs, as fractions of the run that trained it.
    ckpt["config"] = as_fractions(ckpt["config"], len(ckpt.get("history") or []) or 1)
    return ckpt


def model_from_weights(ckpt: dict, *, device: torch.device | None = None, source: str = "weights") -> nn.Module:
    """Rebuild the model of a weights dict and load its state_dict (ImageNet files are never needed)."""
    cfg = TrialConfig.from_dict(ckpt["config"])
    model = model_from_config(cfg, int(ckpt["num_classes"]), load_imagenet=False)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise UserError(f"{source}: the state_dict does not fit a {cfg.arch} built from its config "
                        f"({first_line(err)})") from None
    return model.to(device or torch.device("cpu")).eval()


def load_weights(path: str | os.PathLike, *, device: torch.device | None = None) -> tuple[nn.Module, dict]:
    """Load a weights file: the model in eval mode on `device`, and the file's metadata (no state_dict)."""
    ckpt = read_weights(path)
    model = model_from_weights(ckpt, device=device, source=str(path))
    return model, {k: v for k, v in ckpt.items() if k != "state_dict"}
