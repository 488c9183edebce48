"""hardware=ddp: gradients averaged over the ranks in buckets while the backward still runs.

A post-accumulate-grad hook on each trainable tensor marks it ready once its gradient is complete for the step
(a tensor used at several slots, a root under ``shared`` ties or a tied embedding, accumulates once). Tensors are
put in buckets of about ``bucket_bytes`` in the reverse order of the model's parameters, the order the backward
produces them; a bucket whose tensors are all ready is flattened and all-reduced asynchronously, so communication
overlaps the rest of the backward. Buckets are launched in index order only, so every rank issues the same
collectives in the same order. ``finish`` launches what is left (tensors with no gradient this step get zeros, as
on every rank), waits, and writes the averages back; a tensor that had no gradient this step (on every rank: they run
the same graph) gets none again, so the optimizer skips it as it would in one process (a looped model's prelude under
truncated backprop, a later loop's tensors in a step that drew fewer loops).

The trainable set changes at tying decisions, which DistributedDataParallel's fixed buckets cannot follow: ``arm``
builds the buckets and hooks again for the tensors the optimizer now holds (the trainer calls it after each map).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

BUCKET_BYTES = 25 * 2**20


class _Bucket:
    def __init__(self, params: List[torch.Tensor]):
        self.params = params
        self.ready = 0
        # Once launched: the gradients, flattened into one tensor, and the all-reduce in flight on it.
        self.launched: Optional[Tuple[List[torch.Tensor], torch.Tensor, dist.Work]] = None


class OverlappedGradientAverage:
    """Average the gradients of the armed tensors over ``world_size`` ranks, bucket by bucket during the backward."""

    def __init__(self, world_size: int, bucket_bytes: int = BUCKET_BYTES):
        self.world_size, self.bucket_bytes = world_size, bucket_bytes
        self.buckets: List[_Bucket] = []
        self._bucket_of: dict = {}
        self._handles: list = []
        self._next = 0  # the next bucket to launch
        self._without_grad: List[torch.Tensor] = []  # the tensors that had no gradient this step
        self.launched_in_backward = 0  # buckets launched by hooks (not by finish), over the run

    def arm(self, params: Sequence[torch.Tensor]) -> None:
        """Buckets and hooks for exactly ``params`` (the trainable tensors, in the model's order)."""
        for handle in self._handles:
            handle.remove()
        self._handles, self.buckets, self._bucket_of = [], [], {}
        current: List[torch.Tensor] = []
        size = 0
        for param in reversed(list(params)):
            current.append(param)
            size += param.numel() * param.element_size()
            if size >= self.bucket_bytes:
                self.buckets.append(_Bucket(current))
                current, size = [], 0
        if current:
            self.buckets.append(_Bucket(current))
        for index, bucket in enumerate(self.buckets):
            for param in bucket.params:
                self._bucket_of[id(param)] = index
                self._handles.append(param.register_post_accumulate_grad_hook(self._on_ready))
        self._reset()

    def _reset(self) -> None:
        self._next = 0
        for bucket in self.buckets:
            bucket.ready, bucket.launched = 0, None

    def _on_ready(self, param: torch.Tensor) -> None:
        bucket = self.buckets[self._bucket_of[id(param)]]
        bucket.ready += 1
        while self._next < len(self.buckets) and self.buckets[self._next].ready == len(self.buckets[self._next].params):
            self._launch(self.buckets[self._next])
            self.launched_in_backward += 1

    def _launch(self, bucket: _Bucket) -> None:
        grads = []
        for param in bucket.params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
                self._without_grad.append(param)
            grads.append(param.grad)
        flat = _flatten_dense_tensors(grads)
        bucket.launched = (grads, flat, dist.all_reduce(flat, async_op=True))
        self._next += 1

    def finish(self) -> None:
        """After the backward: launch the buckets not yet launched, wait for all, write back the averages."""
        while self._next < len(self.buckets):
            self._launch(self.buckets[self._next])
        for bucket in self.buckets:
            assert bucket.launched is not None  # every bucket was launched above
            grads, flat, work = bucket.launched
            work.wait()
            flat.div_(self.world_size)
            for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
                grad.copy_(reduced)
        for param in self._without_grad:
            param.grad = None
        self._without_grad = []
        self._reset()
