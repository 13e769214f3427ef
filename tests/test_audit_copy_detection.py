"""The copy detector's footing: pretrained backbone weights from a local file (checked against the
network they came from), Dar's per-image [0, 1] rescaling, the per-epoch cosine schedule, and
refusal of files it cannot trust."""
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from engine.audit.copy_detection import (
    CopyDetectorConfig,
    build_embedder,
    load_backbone_weights,
    load_copy_detector,
    prepare_input,
    read_state_dict,
    train_copy_detector,
)


def rgb_resnet18() -> nn.Module:
    """A torchvision ResNet-18 as ImageNet weights come: 3-channel conv1, 1000-way fc; random but
    non-trivial BatchNorm statistics so that a wrongly copied buffer shows."""
    import torchvision
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    return net.eval()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_imagenet_style_weights_give_the_source_networks_features(tmp_path, suffix):
    src = rgb_resnet18()
    path = str(tmp_path / f"resnet18{suffix}")
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, path)
    ours = build_embedder("resnet18", 128)
    info = load_backbone_weights(ours, path)
    assert info["head_initialised"] == ["fc.bias", "fc.weight"] and len(info["sha1"]) == 40
    ours.eval()
    src.fc, ours.fc = nn.Identity(), nn.Identity()
    grey = torch.rand(2, 1, 64, 64)
    with torch.no_grad():  # a grey image on R, G and B through the RGB net = the grey image through ours
        assert torch.allclose(ours(grey), src(grey.expand(-1, 3, -1, -1)), atol=1e-4, rtol=1e-4)


def test_prefixed_keys_and_one_channel_chest_xray_weights(tmp_path):
    src = build_embedder("resnet18", 14)          # a 1-channel backbone with another head, keys prefixed
    path = str(tmp_path / "cxr.safetensors")
    save_file({"backbone." + k: v.contiguous() for k, v in src.state_dict().items()}, path)
    ours = build_embedder("resnet18", 128)
    load_backbone_weights(ours, path)
    for k, v in src.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(ours.state_dict()[k], v)


def test_bad_weights_files_are_refused_with_the_file_and_key(tmp_path):
    ours = build_embedder("resnet18", 128)
    state = {k: v.contiguous() for k, v in rgb_resnet18().state_dict().items()}
    missing = dict(state)
    del missing["layer2.0.conv1.weight"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match=r"missing\.safetensors: missing tensor 'layer2\.0\.conv1\.weight'"):
        load_backbone_weights(ours, str(tmp_path / "missing.safetensors"))
    save_file({k: v for k, v in state.items()}, str(tmp_path / "r18.safetensors"))
    with pytest.raises(ValueError, match=r"r18\.safetensors: tensor 'layer1\.0\.conv1\.weight' has shape \(64, 64, 3, 3\)"):
        load_backbone_weights(build_embedder("resnet50", 128), str(tmp_path / "r18.safetensors"))
    torch.save({"epoch": 3}, tmp_path / "not_weights.pt")
    with pytest.raises(ValueError, match="not a state dict of tensors"):
        read_state_dict(str(tmp_path / "not_weights.pt"))

    class Executes:        # an object whose unpickling would run code: weights_only refuses it
        def __reduce__(self):
            return (print, ("unpickled",))
    torch.save({"w": Executes()}, tmp_path / "code.pt")
    with pytest.raises(ValueError, match="code.pt: cannot read weights"):
        read_state_dict(str(tmp_path / "code.pt"))
    with pytest.raises(ValueError, match="does not exist"):
        read_state_dict(str(tmp_path / "absent.pth"))


def test_per_image_rescaling_and_imagenet_standardisation():
    images = np.stack([np.linspace(10, 200, 64).reshape(8, 8), np.full((8, 8), 77.0)]).astype(np.uint8)
    x = prepare_input(images, CopyDetectorConfig(backbone="tiny"), "cpu")
    assert x.shape == (2, 1, 8, 8)
    assert x[0].min() == 0.0 and x[0].max() == 1.0 and torch.all(x[1] == 0)
    # the same image at another contrast and offset gives the same input
    brighter = (images[:1].astype(np.float64) * 0.5 + 100).round().astype(np.uint8)
    assert torch.allclose(prepare_input(brighter, CopyDetectorConfig(backbone="tiny"), "cpu"), x[:1], atol=0.02)
    inet = prepare_input(images[:1], CopyDetectorConfig(backbone="tiny", input_normalization="imagenet"), "cpu")
    assert torch.allclose(inet, (x[:1] - 0.449) / 0.226)


def test_cosine_schedule_steps_once_per_epoch_and_old_files_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    train, val = rng.integers(0, 256, (20, 16, 16), dtype=np.uint8), rng.integers(0, 256, (6, 16, 16), dtype=np.uint8)
    cfg = CopyDetectorConfig(backbone="tiny", epochs=4, batch_size=8, lr=1e-3)
    det = train_copy_detector(train, val, cfg, progress=False)
    lrs = [h["lr"] for h in det.info["history"]]
    assert lrs == pytest.approx([1e-3 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)])
    best = min(det.info["history"], key=lambda h: h["val_loss"])
    assert det.info["best_epoch"] == best["epoch"]
    det.save(str(tmp_path))
    assert np.allclose(load_copy_detector(str(tmp_path)).embed(val), det.embed(val), atol=1e-6)
    meta = json.loads((tmp_path / "copy_detector.json").read_text())
    del meta["config"]["input_scaling"]
    (tmp_path / "copy_detector.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="per-image"):
        load_copy_detector(str(tmp_path))
