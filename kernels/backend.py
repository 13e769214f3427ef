"""Which implementation a kernel dispatch uses: the Triton kernel or its PyTorch reference.

`MEMDIFF_KERNELS` forces the choice for tests and benchmarks:
  auto       (default) Triton when every tensor is on CUDA, the reference otherwise
  triton     always Triton (on CPU this needs TRITON_INTERPRET=1)
  reference  always the PyTorch reference
"""
import os

import torch

_CHOICES = ("auto", "triton", "reference")


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
