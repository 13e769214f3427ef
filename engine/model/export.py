"""The exported model: everything sampling and the memorization tools need, and nothing pickled.

    <dir>/model.safetensors   EMA weights (safetensors: loading never runs arbitrary code)
    <dir>/model_config.json   {"format": 1, "unet": UNetConfig, "diffusion": DiffusionConfig, ...}
    <dir>/vocab.json          the prompt vocabulary the model was trained with

`load_model` accepts that directory, a training run directory holding it under `export/`, or
the path of the .safetensors file itself.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from data_pipeline.atomic_files import atomic_path, write_json
from data_pipeline.config_schema import InvalidConfig, build
from data_pipeline.json_files import read_json_object
from data_pipeline.vocab import Vocabulary
from engine.diffusion.schedule import DiffusionConfig, NoiseSchedule
from engine.model.network_files import build_network, read_weights
from engine.model.unet import ConditionalUNet, UNetConfig

FORMAT_VERSION = 1
WEIGHTS, CONFIG, VOCAB = "model.safetensors", "model_config.json", "vocab.json"


@dataclass
class LoadedModel:
    model: ConditionalUNet
    schedule: NoiseSchedule
    vocab: Vocabulary
    unet_config: UNetConfig
    diffusion_config: DiffusionConfig
    metadata: dict
    path: Path


def export_model(out_dir: str | os.PathLike, model: ConditionalUNet, diffusion_cfg: DiffusionConfig,
                 vocab: Vocabulary, metadata: dict | None = None) -> Path:
    """Write weights, config and vocabulary to `out_dir` (each file atomically). Returns the dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(out / WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"format": str(FORMAT_VERSION)})
    config = {"format": FORMAT_VERSION, "unet": model.cfg.to_dict(), "diffusion": asdict(diffusion_cfg),
              "metadata": metadata or {}}
    write_json(out / CONFIG, config, indent=2)
    vocab.save(str(out / VOCAB))
    return out


def resolve_export_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_file() and p.name.endswith(".safetensors"):
        return p.parent
    for candidate in (p, p / "export"):
        if (candidate / WEIGHTS).is_file():
            return candidate
    raise FileNotFoundError(f"{p}: no {WEIGHTS} here or under {p / 'export'} (is this a memdiff run or export?)")


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """Load an exported model in eval mode on `device`.

    Nothing in the files is trusted: the config's sizes are bounded (UNetConfig), the network is
    checked against the weights' names and shapes on the meta device before it is allocated, and
    non-finite weights are refused (engine.model.network_files). The model remembers its weights
    file (`model.source`), so a sampler can name it when its output is not finite."""
    d = resolve_export_dir(path)
    for name in (CONFIG, VOCAB):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d / name}: missing (an export needs {WEIGHTS}, {CONFIG} and {VOCAB})")
    config = read_json_object(d / CONFIG)
    if config.get("format") != FORMAT_VERSION:
        raise ValueError(f"{d / CONFIG}: format {str(config.get('format'))[:40]}, this memdiff reads {FORMAT_VERSION}")
    try:
        unet_cfg = build(UNetConfig, config.get("unet"), "unet")
        diffusion_cfg = build(DiffusionConfig, config.get("diffusion"), "diffusion")
    except InvalidConfig as exc:
        raise ValueError(f"{d / CONFIG}: {exc}") from None
    metadata = config.get("metadata", {})
    if not isinstance(metadata, dict):
        raise ValueError(f"{d / CONFIG}: metadata: expected an object")
    vocab = Vocabulary.load(str(d / VOCAB))
    if len(vocab) > unet_cfg.vocab_size:
        raise ValueError(f"{d / VOCAB}: {len(vocab)} tokens but the model embeds only {unet_cfg.vocab_size}")
    if vocab.max_len > unet_cfg.max_tokens:
        raise ValueError(f"{d / VOCAB}: prompts of up to {vocab.max_len} tokens but the model takes only "
                         f"{unet_cfg.max_tokens}")
    model = build_network(lambda: ConditionalUNet(unet_cfg), read_weights(d / WEIGHTS), d / WEIGHTS, d / CONFIG)
    model.to(device).eval()
    model.source = str(d / WEIGHTS)
    return LoadedModel(model, NoiseSchedule.from_config(diffusion_cfg), vocab, unet_cfg, diffusion_cfg,
                       metadata, d)
