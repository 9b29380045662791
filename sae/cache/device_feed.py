"""Batches onto the training device without stalling the step.

On CUDA, `to_device` copies batch k+1 on a side stream while the step on batch k runs: the copy
starts from page-locked memory (the cache reader pins its buffers when CUDA is available), so it is
a DMA transfer that neither the host nor the compute stream waits for. The step's stream waits for
the copy (an event, not the host), and a batch's host memory is released to the reader only once
its copy has finished, so a reused buffer is never overwritten while the GPU still reads it.
Elsewhere batches go through unchanged (CPU) or with a plain copy (other devices).
"""

from __future__ import annotations

from typing import Iterable, Iterator, Mapping

import torch
from torch import Tensor

Batch = Mapping[str, Tensor]


def to_device(batches: Iterable[Batch], device: str | torch.device) -> Iterator[Batch]:
    """The batches of `batches`, each tensor on `device` in its own dtype (convert on the device)."""
    device = torch.device(device)
    if device.type == "cpu":
        return iter(batches)
    if device.type == "cuda":
        return _cuda_feed(iter(batches), device)
    return ({k: _to(v, device) for k, v in b.items()} for b in batches)


def _to(v, device: torch.device, non_blocking: bool = False):
    return v.to(device, non_blocking=non_blocking) if isinstance(v, Tensor) else v


def _cuda_feed(batches: Iterator[Batch], device: torch.device) -> Iterator[Batch]:
    copy_stream = torch.cuda.Stream(device)
    pending = None  # (host batch, its device copy, event: copy done)
    for host in batches:
        staged = _start_copy(host, device, copy_stream)  # batch k+1, while k is trained on
        if pending is not None:
            yield _hand_over(pending, device)
            pending[2].synchronize()  # only now may the reader reuse batch k's host memory
        pending = staged
    if pending is not None:
        yield _hand_over(pending, device)
        pending[2].synchronize()


def _start_copy(host: Batch, device: torch.device, stream: torch.cuda.Stream) -> tuple:
    with torch.cuda.stream(stream):
        on_device = {k: _to(v, device, non_blocking=True) for k, v in host.items()}
        done = torch.cuda.Event()
        done.record(stream)
    return host, on_device, done


def _hand_over(pending: tuple, device: torch.device) -> Batch:
    """The device batch, usable on the current stream: that stream waits for the copy, and the
    caching allocator learns that the current stream uses memory allocated on the copy stream."""
    _, on_device, done = pending
    current = torch.cuda.current_stream(device)
    current.wait_event(done)
    for v in on_device.values():
        if isinstance(v, Tensor) and v.device.type == "cuda":
            v.record_stream(current)
    return on_device
