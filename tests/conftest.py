"""Test-session settings shared by all test files.

Triton decides whether its kernels (and its own tl.* library functions) are interpreted when they
are decorated, i.e. at first import: the interpreter must be switched on before any test module
imports triton (engine imports kernels, kernels import triton). Without a GPU the Triton kernels
can only run interpreted, so that is the default there; an explicit TRITON_INTERPRET is respected.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
