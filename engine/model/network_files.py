"""Files of networks: the audit's small networks (copy detector, label classifier) as safetensors +
JSON, and the one checked way any network (the exported U-Net too) is built from its weights.

    <dir>/<name>.safetensors   the weights
    <dir>/<name>.json          {"format": "memdiff-<name>", ...config, threshold, training record}

Both files are written atomically (temporary name, then rename), so an interrupted save never
leaves a half-written network behind a good name. Reading never unpickles, and a file someone
sent is checked before it is trusted: `build_network` builds the network on the meta device
first and compares every tensor's name and shape with the file's, so a config with huge
dimensions or a file with missing or reshaped tensors is a one-line error naming the file and the
key before anything of the config's size is allocated; non-finite weights are refused by name.
"""
from __future__ import annotations

import hashlib
import os
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from data_pipeline.atomic_files import atomic_path, write_json
from data_pipeline.config_schema import build
from data_pipeline.json_files import read_json_object


def _format(name: str) -> str:
    return "memdiff-" + name.replace("_", "-")


def save_network(out_dir: str, name: str, model: nn.Module, meta: dict) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(os.path.join(out_dir, f"{name}.safetensors")) as tmp:
        save_file(state, str(tmp))
    write_json(os.path.join(out_dir, f"{name}.json"), {"format": _format(name), **meta})


def read_weights(weights_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (never unpickled); one-line errors name the file, and the
    tensor that holds NaN or infinite values."""
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights_path}: not a readable safetensors file ({' '.join(str(e).split())})") from None
    for key, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{weights_path}: tensor {key!r} holds NaN or infinite values")
    return state


def load_network(path: str, name: str, trained_by: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, metadata without "format") of the network `name` in folder `path`; one-line
    errors name the missing, foreign or damaged file. Build the network with `build_network`."""
    meta_path, weights_path = os.path.join(path, f"{name}.json"), os.path.join(path, f"{name}.safetensors")
    for p in (meta_path, weights_path):
        if not os.path.isfile(p):
            raise ValueError(f"{p}: missing (train one with {trained_by})")
    meta = read_json_object(meta_path)
    if meta.pop("format", None) != _format(name):
        raise ValueError(f"{meta_path}: not a {_format(name)} file")
    return read_weights(weights_path), meta


def network_config(cls: type, raw, config_path: str | os.PathLike):
    """The dataclass `cls` from the "config" object of a network's JSON, its keys, types and values
    checked (data_pipeline.config_schema.build); a one-line error naming the file and the key."""
    try:
        return build(cls, raw, "config")
    except ValueError as exc:     # InvalidConfig, or the dataclass's own check
        raise ValueError(f"{config_path}: {exc}") from None


def build_network(build: Callable[[], nn.Module], state: dict[str, torch.Tensor], weights_path: str | os.PathLike,
                  config_path: str | os.PathLike) -> nn.Module:
    """`build()` holding `state` (the tensors of `weights_path`), on the CPU.

    `build` makes the network from a config read from `config_path` (named in errors). It is called
    on the meta device first: every tensor it expects must be in the file with the same shape, and
    the file may hold no other, before the real network is allocated (a config's sizes are not
    trusted: a tampered one would otherwise allocate until memory runs out)."""
    try:
        with torch.device("meta"):
            skeleton = build()
    except (ValueError, RuntimeError, TypeError) as exc:   # sizes the layers themselves refuse
        raise ValueError(f"{config_path}: its network cannot be built ({' '.join(str(exc).split())})") from None
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    for key, shape in expected.items():   # in the network's order: the first problem is the one named
        if key not in state:
            missing = sum(k not in state for k in expected)
            raise ValueError(f"{weights_path}: has no tensor {key!r}, which the network of {config_path} needs "
                             f"({missing} missing)")
        if tuple(state[key].shape) != shape:
            raise ValueError(f"{weights_path}: tensor {key!r} has shape {list(state[key].shape)}, the network of "
                             f"{config_path} needs {list(shape)}")
    extra = [k for k in state if k not in expected]
    if extra:
        raise ValueError(f"{weights_path}: holds a tensor {extra[0][:80]!r} that the network of {config_path} does "
                         f"not have ({len(extra)} unexpected)")
    model = build()
    model.load_state_dict(state)
    return model


def file_sha1(path: str | os.PathLike) -> str:
    """SHA-1 of a file's bytes, read in blocks (weights files can be GBs): names the weights exactly."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def state_dict_sha1(model: nn.Module) -> str:
    """SHA-1 over a network's tensors, key by key in sorted order: names trained weights held in memory."""
    h = hashlib.sha1()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
