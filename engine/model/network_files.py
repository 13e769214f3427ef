"""Files of the audit's small networks (copy detector, label classifier): never pickled.

    <dir>/<name>.safetensors   the weights
    <dir>/<name>.json          {"format": "memdiff-<name>", ...config, threshold, training record}

Both files are written atomically (temporary name, then rename), so an interrupted save never
leaves a half-written network behind a good name.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from data_pipeline.atomic_files import atomic_path, write_json


def _format(name: str) -> str:
    return "memdiff-" + name.replace("_", "-")


def save_network(out_dir: str, name: str, model: nn.Module, meta: dict) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(os.path.join(out_dir, f"{name}.safetensors")) as tmp:
        save_file(state, str(tmp))
    write_json(os.path.join(out_dir, f"{name}.json"), {"format": _format(name), **meta})


def load_network(path: str, name: str, trained_by: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, metadata without "format") from `path`; one-line errors name the missing file."""
    meta_path, weights_path = os.path.join(path, f"{name}.json"), os.path.join(path, f"{name}.safetensors")
    for p in (meta_path, weights_path):
        if not os.path.isfile(p):
            raise ValueError(f"{p}: missing (train one with {trained_by})")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.pop("format", None) != _format(name):
        raise ValueError(f"{meta_path}: not a {_format(name)} file")
    return load_file(weights_path), meta
