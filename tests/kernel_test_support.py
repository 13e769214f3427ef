"""Scaffolding shared by the Triton kernel tests (tests/test_kernels_*.py)."""
import importlib
import random
from types import ModuleType

import pytest
import torch


def interpreted_kernel_module(name: str) -> ModuleType:
    """Import kernel module `name`, or skip: the tests run Triton on CPU tensors under the interpreter.

    tests/conftest.py turns the interpreter on before triton's first import when there is no GPU.
    """
    from triton import knobs
    if not knobs.runtime.interpret:
        pytest.skip("Triton kernel tests run on CPU tensors under TRITON_INTERPRET=1 (set before triton's import)")
    return importlib.import_module(name)


def poison_allocations(module: ModuleType, monkeypatch) -> None:
    """Make the module's output buffers start as NaN, so an element a kernel forgets to write shows."""
    monkeypatch.setattr(module, "_alloc",
                        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))


def fresh_seed() -> int:
    """A new seed every run: each run checks fresh random inputs. The seed is printed, and pytest
    shows a failing test's captured output, so every failure names the seeds it ran with."""
    seed = random.SystemRandom().randrange(2**31)
    print(f"fresh_seed: {seed}")
    return seed
