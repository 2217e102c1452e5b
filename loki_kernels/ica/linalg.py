"""Dense linear algebra helpers the ICA modules share, tuned for torch on the CPU as well as the GPU."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

__all__ = ["one_cpu_thread", "thin_svd", "SMALL"]

SMALL = 2048  # decompositions whose smaller side is at most this run on one CPU thread (thin_svd)


@contextlib.contextmanager
def one_cpu_thread(tensor: Tensor):
    """Run a LAPACK decomposition on one CPU thread (the torch setting is restored on exit).

    MKL's threaded ``syevd`` and ``gesdd`` synchronise often; on a busy CPU their spin-waiting threads make a
    512 × 512 float64 ``eigh`` take ~12 s on 2 threads against ~0.15 s on one, and a 2048 × 1000 float32 SVD
    ~8 s against ~1 s. Only the ``l × l`` problems of the stream mode and FastICA's whitening go through it;
    the large products stay multi-threaded.
    """
    if tensor.device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def thin_svd(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.linalg.svd(a, full_matrices=False)``, computed on the tall orientation.

    On the CPU, torch's LAPACK SVD of a wide matrix is many times slower than of its transpose (a 1010 × 17280
    float32 matrix: ~90 s against ~14 s on 2 cores), so a wide ``a`` is decomposed as ``aᵀ``; on one thread
    (:func:`one_cpu_thread`) when its smaller side is at most ``SMALL``.
    """
    with one_cpu_thread(a) if min(a.shape) <= SMALL else contextlib.nullcontext():
        if a.shape[0] >= a.shape[1]:
            return torch.linalg.svd(a, full_matrices=False)
        v, s, ut = torch.linalg.svd(a.T, full_matrices=False)
    return ut.T, s, v.T
