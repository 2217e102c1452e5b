"""One file per op: Triton kernels, the autograd.Function and the PyTorch path live together."""

from .split_linear import SplitLinearFunction, make_slot, split_linear

__all__ = ["split_linear", "make_slot", "SplitLinearFunction"]
