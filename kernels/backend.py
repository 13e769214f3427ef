"""Which implementation a kernel dispatch uses (the Triton kernel or its PyTorch reference), and how
the launch code describes the launches it makes.

`MEMDIFF_KERNELS` forces the choice for tests and benchmarks:
  auto       (default) Triton when every tensor is on CUDA, the reference otherwise
  triton     always Triton (on CPU this needs TRITON_INTERPRET=1)
  reference  always the PyTorch reference

Every launch is built as a `Launch` by one builder per kernel; the launchers run it and
`kernels.aot` compiles the same `Launch`es ahead of time for real GPU targets, so what is compiled
in CI is what the dispatch launches. The launch space of each kernel module is its
`launch_space()`: the real builders applied to meta tensors of every dtype in TRITON_DTYPES and
every option the dispatch takes.
"""
import os
from dataclasses import dataclass, field
from typing import Any

import torch

_CHOICES = ("auto", "triton", "reference")

# Tensor dtypes a dispatch sends to Triton; anything else (float64 for exactness checks) runs the reference.
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NUM_WARPS = 4            # Triton's default, named so that launches and AOT compiles state it
MAX_GRID_X = 2**31 - 1   # CUDA gridDim limits (all compute capabilities >= 3.0)
MAX_GRID_YZ = 65535
INT32_MAX = 2**31 - 1


def kernel_mode() -> str:
    mode = os.environ.get("MEMDIFF_KERNELS", "auto").strip().lower()
    if mode not in _CHOICES:
        raise ValueError(f"MEMDIFF_KERNELS={mode!r}: expected one of {', '.join(_CHOICES)}")
    return mode


def use_triton(*tensors: torch.Tensor) -> bool:
    mode = kernel_mode()
    if mode == "reference":
        return False
    if mode == "triton":
        return True
    return all(t.is_cuda for t in tensors if t is not None)


def secondary_dtypes(primary: torch.dtype) -> tuple[torch.dtype, ...]:
    """Dtypes a kernel's secondary input (read next to a primary one of dtype `primary`) is passed in."""
    return (primary,) if primary == torch.float32 else (primary, torch.float32)


def as_secondary(t: torch.Tensor, primary: torch.dtype) -> torch.Tensor:
    """t, contiguous, in one of secondary_dtypes(primary): any other dtype is widened or rounded to
    float32 first. The kernels load every input with .to(float32), so this changes no result; it
    keeps the set of compiled variants finite (see launch_space() in each kernel module)."""
    if t.dtype not in secondary_dtypes(primary):
        t = t.to(torch.float32)
    return t.contiguous()


def check_blocks_per_sample(where: str, n_per_sample: int, block: int) -> None:
    """Per-sample blocks run along grid dim 1 (at most MAX_GRID_YZ), which also keeps every
    in-sample column index below 2^31 (MAX_GRID_YZ * block + block < 2^31 for block <= 2^14)."""
    if -(-n_per_sample // block) > MAX_GRID_YZ:
        raise ValueError(f"{where}: {n_per_sample} elements per sample; the kernel takes at most "
                         f"{MAX_GRID_YZ * block} ({MAX_GRID_YZ} blocks of {block}, CUDA's grid y limit)")


@dataclass(frozen=True)
class Launch:
    """One kernel launch as the launch code builds it: kernel[grid](*args, num_warps, **constexprs)."""
    kernel: Any
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict = field(default_factory=dict)
    num_warps: int = NUM_WARPS

    def __post_init__(self):
        g = tuple(self.grid) + (1,) * (3 - len(self.grid))
        if not (0 <= g[0] <= MAX_GRID_X and all(0 <= d <= MAX_GRID_YZ for d in g[1:])):
            name = getattr(self.kernel, "__name__", type(self.kernel).__name__)
            raise ValueError(f"{name}: launch grid {tuple(self.grid)} outside CUDA's limits "
                             f"(x <= {MAX_GRID_X}, y and z <= {MAX_GRID_YZ})")

    def run(self) -> None:
        self.kernel[self.grid](*self.args, num_warps=self.num_warps, **self.constexprs)
