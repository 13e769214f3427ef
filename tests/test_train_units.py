"""Trainer parts without DeepSpeed processes: EMA against its closed form, checkpoint switching that
survives an interrupted write, and the per-step seeds that make resume exact."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from engine.training.checkpointing import LATEST, STATE, latest_tag, save_checkpoint
from engine.training.diffusion_loss import step_seed
from engine.training.ema import EMA, ema_decay_at


def test_ema_matches_closed_form():
    net = nn.Linear(3, 2)
    start = {n: p.detach().clone() for n, p in net.named_parameters()}
    ema = EMA(net, decay=0.9, warmup=False)
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(1.0)
    for step in range(5):
        ema.update(net, step)
    # A constant target c after n updates of decay d: shadow = d^n * start + (1 - d^n) * c.
    for name, value in ema.state_dict().items():
        torch.testing.assert_close(value, 0.9 ** 5 * start[name] + (1 - 0.9 ** 5) * 1.0)
    copy = ema.copy_to(nn.Linear(3, 2))
    torch.testing.assert_close(copy.weight, ema.state_dict()["weight"])


def test_ema_warmup_schedule():
    assert ema_decay_at(0, 0.999, True) == pytest.approx(0.1)
    assert ema_decay_at(90, 0.999, True) == pytest.approx(0.91)
    assert ema_decay_at(10**6, 0.999, True) == 0.999
    assert ema_decay_at(0, 0.999, False) == 0.999


def test_step_seeds_are_distinct_per_step_and_rank_and_stable():
    seeds = {step_seed(0, s, r) for s in range(200) for r in range(4)}
    assert len(seeds) == 800 and all(0 <= s < 2**63 for s in seeds)
    assert step_seed(3, 17, 1) == step_seed(3, 17, 1) and step_seed(3, 17, 1) != step_seed(4, 17, 1)


class FakeEngine:
    """Writes what DeepSpeed would (one file per tag), optionally dying half-way."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False  # `latest` is ours to switch, only once the checkpoint is complete
        d = torch.tensor([1.0])
        Path(save_dir, tag).mkdir(parents=True, exist_ok=True)
        torch.save({"module": d}, f"{save_dir}/{tag}/mp_rank_00_model_states.pt")
        if self.fail:
            raise KeyboardInterrupt("killed while writing")


def test_interrupted_write_never_replaces_the_good_checkpoint(tmp_path):
    ema = EMA(nn.Linear(2, 2), decay=0.9)
    ckpt = tmp_path / "checkpoints"
    save_checkpoint(FakeEngine(), ckpt, 10, ema, {"micro_step": 10}, keep=2, rank=0)
    assert latest_tag(ckpt) == "step_00000010"
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(FakeEngine(fail=True), ckpt, 20, ema, {}, keep=2, rank=0)
    assert latest_tag(ckpt) == "step_00000010"          # still the good one
    assert not (ckpt / "step_00000020").exists()        # the half-written one stays under its tmp tag
    # The next save cleans the leftover and switches; pruning keeps the newest `keep`.
    save_checkpoint(FakeEngine(), ckpt, 20, ema, {}, keep=2, rank=0)
    save_checkpoint(FakeEngine(), ckpt, 30, ema, {}, keep=2, rank=0)
    assert latest_tag(ckpt) == "step_00000030"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step_00000020", "step_00000030"]
    assert json.loads((ckpt / "step_00000030" / STATE).read_text())["step"] == 30
    assert (ckpt / LATEST).read_text() == "step_00000030\n"


def test_latest_naming_an_incomplete_checkpoint_is_an_error(tmp_path):
    (tmp_path / "step_00000005").mkdir()
    (tmp_path / LATEST).write_text("step_00000005\n")
    with pytest.raises(RuntimeError, match="not a complete checkpoint"):
        latest_tag(tmp_path)
    assert latest_tag(tmp_path / "nothing") is None
