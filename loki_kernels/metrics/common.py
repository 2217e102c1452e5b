"""What the metrics share: the model's device, eval + inference mode, progress bars, argument checks."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

__all__ = ["model_device", "evaluating", "progress_bar", "check_batch_size", "check_rows"]


def model_device(model: nn.Module) -> torch.device:
    """Where the model's (first) parameters live; inputs are moved there."""
    return next(model.parameters(), torch.empty(0)).device


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """Eval mode and inference mode for the block (yields the model's device); the training flag is restored."""
    training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield model_device(model)
    finally:
        model.train(training)


def progress_bar(total: int, desc: str, progress: bool):
    """A tqdm bar over batches (on stderr); ``progress=False``: none."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", disable=not progress)


def check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def check_rows(tokens: Tensor, what: str) -> None:
    """``tokens`` must be integer ids ``[rows ≥ 1, seq_len ≥ 2]`` (a row predicts ``seq_len − 1`` tokens)."""
    if not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] < 2 \
            or tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ValueError(f"{what}: tokens must be integer ids [rows ≥ 1, seq_len ≥ 2], got {shape}")
