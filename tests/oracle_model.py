"""A model whose generations are known in advance, for audits that must find what it copied.

OracleModel predicts the noise that makes x0 exactly a chosen image for every prompt containing a
given token id (in [-1, 1]; the null prompt and other prompts get 0). With w = 1 and deterministic
DDIM the generation is then exactly that image, so which generation copies which training image is
known without any learned model.
"""
from types import SimpleNamespace

import numpy as np
import torch

from engine.diffusion.schedule import DiffusionConfig, NoiseSchedule


class OracleModel(torch.nn.Module):
    def __init__(self, targets: dict[int, np.ndarray], schedule: NoiseSchedule, size: int = 16):
        super().__init__()
        self.cfg = SimpleNamespace(in_channels=1, image_size=size)
        self.schedule = schedule
        self.targets = {k: torch.from_numpy(np.asarray(v)).float().div(127.5).sub(1) for k, v in targets.items()}
        self.dummy = torch.nn.Parameter(torch.zeros(1))   # a device for callers that ask the parameters

    def encode(self, tokens):
        return tokens.float(), tokens != 0

    def denoise(self, x, t, context, mask):
        x0 = torch.zeros_like(x)
        for i, row in enumerate(context.long()):
            for tok, img in self.targets.items():
                if tok in row.tolist():
                    x0[i, 0] = img
        a, s = self.schedule.sqrt_ab(t).view(-1, 1, 1, 1), self.schedule.sqrt_1mab(t).view(-1, 1, 1, 1)
        return (x - a * x0) / s


def oracle_loaded(targets: dict[int, np.ndarray], vocab, size: int = 16, p_uncond: float = 0.5,
                  num_timesteps: int = 100) -> SimpleNamespace:
    """What engine.model.export.load_model returns, around an OracleModel."""
    schedule = NoiseSchedule("linear", num_timesteps)
    model = OracleModel(targets, schedule, size)
    return SimpleNamespace(model=model, schedule=schedule, vocab=vocab, unet_config=model.cfg,
                           diffusion_config=DiffusionConfig(num_timesteps=num_timesteps),
                           metadata={"p_uncond": p_uncond})
