"""One file per op: Triton kernels, the autograd.Function and the PyTorch path live together.

* :mod:`.split_linear`: the split matmul behind every patched ``down_proj`` (LoKI's core).
* :mod:`.kva_quadrature`: integrated-gradient interpolation and weighted reduction for KVA.
* :mod:`.covariance`: ``C += Xᵀ·diag(mask)·X`` (upper triangle; K-FAC factors) and ``symmetrize_``.
* :mod:`.common`: helpers the op files share (device guard, compute dtype, interpreter switches).
"""

from .covariance import covariance_, symmetrize_
from .split_linear import SplitLinearFunction, make_index_map, ordered_rows, split_linear, write_back_

__all__ = [
    "split_linear", "make_index_map", "ordered_rows", "write_back_", "SplitLinearFunction", "covariance_",
    "symmetrize_",
]
