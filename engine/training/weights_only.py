"""DeepSpeed's checkpoint files read without running anything they contain.

DeepSpeed stores model and optimizer states with torch.save (pickle) and reads them back with
`torch.load(weights_only=False)`: a pickle can name any callable, so a run folder someone sent
could run code on `--resume auto`. A digest written by our own save does not help (whoever crafts
the folder writes matching digests), so every torch.load inside `weights_only_loads()` is forced to
torch's weights-only unpickler, which builds only tensors, containers, numbers and strings, plus
the few DeepSpeed classes below. Anything else is refused before it is built.

ALLOWED_GLOBALS is exactly what DeepSpeed 0.18 puts into its files (found with
torch.serialization.get_unsafe_globals_in_checkpoint on checkpoints saved at ZeRO 0, 1, 2 and 3,
fp32 and bf16): the optimizer states of ZeRO 1-3 hold a LossScaler, the ZeroStageEnum and, at
ZeRO 1-2, fragment_address records. Each is a plain record whose construction runs no I/O.
"""
from __future__ import annotations

import contextlib
import pickle
import re
from typing import Iterator

import torch

ALLOWED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class UnsafeCheckpointFile(ValueError):
    """A checkpoint file that asks the unpickler for something other than weights; one line."""


def _allowed() -> list:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler  # noqa: PLC0415 - deepspeed imports slowly
    from deepspeed.runtime.zero.config import ZeroStageEnum  # noqa: PLC0415
    from deepspeed.utils.tensor_fragment import fragment_address  # noqa: PLC0415

    classes = [LossScaler, ZeroStageEnum, fragment_address]
    assert [f"{c.__module__}.{c.__qualname__}" for c in classes] == list(ALLOWED_GLOBALS)
    return classes


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Within the block every `torch.load` (DeepSpeed's included) is weights-only with
    ALLOWED_GLOBALS; a file that needs anything else raises UnsafeCheckpointFile naming it."""
    real_load, allowed = torch.load, _allowed()

    def load(f, map_location=None, *args, **kwargs):
        kwargs.pop("weights_only", None)
        if args or kwargs.get("pickle_module") is not None:
            raise UnsafeCheckpointFile(f"{f}: refused, a custom pickle module was asked for")
        with torch.serialization.safe_globals(allowed):
            try:
                return real_load(f, map_location=map_location, weights_only=True, **kwargs)
            except pickle.UnpicklingError as exc:
                found = re.search(r"GLOBAL (\S+)", str(exc)) or re.search(r"Unsupported operand \d+", str(exc))
                what = f"it asks for {found.group(0).removeprefix('GLOBAL ')}" if found else "not a weights file"
                raise UnsafeCheckpointFile(f"{f}: refused to load, {what} (only tensors and DeepSpeed's "
                                           f"optimizer records are read from checkpoints)") from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = real_load
