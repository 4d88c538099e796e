"""Extra passes leave normalisation statistics alone.

A Uni-Mlip step runs the towers more than once per sample: the second image view, the feature-level
(perturbed) passes, the augmented and masked reports, and with accumulated negatives a gradient-free pass that
caches every micro batch's embeddings. In train mode each of those passes would update a BatchNorm layer's
running mean / variance and its ``num_batches_tracked`` counter (a ResNet tower's counter went 0 -> 3 -> 6
per micro batch), so the statistics used at evaluation would be those of perturbed inputs, averaged with a
momentum meant for one update per batch. Here every pass except the clean pass of the first view updates
nothing: the statistics after a step are those a plain CLIP step over the same images would leave.

The pass itself is unchanged (train-mode BatchNorm normalises with the batch's own statistics either way);
only the buffers are saved before and written back after, so this works for any module that keeps running
statistics under the usual names (``torch.nn`` BatchNorm / SyncBatchNorm / InstanceNorm with
``track_running_stats``, timm's BatchNormAct), whatever mode it is in.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

#: buffer names (last component) that a normalisation layer updates in a train-mode forward
RUNNING_STAT_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def running_stats(*modules: nn.Module) -> list[torch.Tensor]:
    """Every running-statistics buffer of ``modules`` (each once)."""
    seen, out = set(), []
    for module in modules:
        for name, buf in module.named_buffers():
            if name.rsplit(".", 1)[-1] in RUNNING_STAT_BUFFERS and id(buf) not in seen:
                seen.add(id(buf))
                out.append(buf)
    return out


@contextmanager
def frozen_running_stats(*modules: nn.Module) -> Iterator[None]:
    """Inside: forwards of ``modules`` may update their running statistics; on exit every such buffer holds
    its value from before again (also after an exception)."""
    saved = [(buf, buf.detach().clone()) for buf in running_stats(*modules)]
    try:
        yield
    finally:
        # Written through .data: autograd keeps the running buffers of a train-mode BatchNorm among its saved
        # tensors (its backward reads only the batch statistics it saved beside them), and an ordinary in-place
        # write would bump their version and make that backward refuse to run. In eval mode the values are
        # unchanged, so nothing a backward reads changes either.
        for buf, value in saved:
            buf.data.copy_(value)
