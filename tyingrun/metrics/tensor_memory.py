"""Peak bytes held by live tensor storages over a region of code, measured the same way on every device.

Every tensor an op creates inside the region is seen by a dispatch mode; its storage is counted once,
however many tensors view it, from then until the storage is freed (a weakref on the storage's Python
object, which torch keeps alive exactly as long as the storage itself). Tensors that exist before the
region (weights, gradients, optimizer state) are counted from entry when `state_tensors` yields them.
This counts what `torch.cuda.max_memory_allocated` counts, up to the allocator's rounding and the
workspaces kernels allocate for themselves (cuBLAS, cuDNN), which no op returns.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Union

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from tyingrun.tying.weights import local_view

StateTensors = Callable[[], Iterable[torch.Tensor]]


@dataclass
class _Storage:
    nbytes: int
    born: int  # registration order, to tell which storages were live at the peak
    is_state: bool


def training_state(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> Iterator[torch.Tensor]:
    """The tensors a training run keeps between steps: weights, buffers, gradients, optimizer state."""
    for param in model.parameters():
        yield param
        if param.grad is not None:
            yield param.grad
    yield from model.buffers()
    if optimizer is not None:
        for state in optimizer.state.values():
            yield from (value for value in state.values() if isinstance(value, torch.Tensor))


def _tensors_in(output) -> Iterator[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        yield output
    elif isinstance(output, (list, tuple)):
        for item in output:
            yield from _tensors_in(item)


def _returns_new_storage(func) -> bool:
    # lift_fresh is how torch.tensor(...) hands over a tensor it built outside the dispatcher.
    if func is torch.ops.aten.lift_fresh.default:
        return True
    return all(ret.alias_info is None for ret in func._schema.returns)


class TensorMemoryTracker(TorchDispatchMode):
    """Context manager: `peak_bytes`, and at exit its split into `state_bytes_at_peak` and `other_bytes_at_peak`.

    `state_tensors` yields the tensors that are state (see `training_state`); it is called at entry, at
    `reclassify()` and at exit, and a storage it yields at any of those points counts as state at the peak.
    `device`, when given, restricts the count to storages on that device, as `max_memory_allocated(device)` does.
    """

    def __init__(self, state_tensors: Optional[StateTensors] = None, device: Union[torch.device, str, None] = None):
        super().__init__()
        self._state_tensors = state_tensors
        self._device = None if device is None else torch.device(device)
        self._new_storage_ops: Dict[object, bool] = {}
        self._live: Dict[int, _Storage] = {}
        self._finalizers: Dict[int, weakref.ref] = {}
        self._freed_since_peak: List[_Storage] = []
        self._registered = 0
        self._peak_born = 0
        self.live_bytes = 0
        self.peak_bytes = 0
        self.state_bytes_at_peak = 0
        self.other_bytes_at_peak = 0

    def __enter__(self):
        if self._registered:
            raise RuntimeError("a TensorMemoryTracker measures one region; make a new one")
        super().__enter__()
        self.reclassify()
        return self

    def __exit__(self, *exc):
        try:
            self.reclassify()
            self.state_bytes_at_peak = sum(s.nbytes for s in self._live_at_peak() if s.is_state)
            self.other_bytes_at_peak = self.peak_bytes - self.state_bytes_at_peak
        finally:
            # Dropping the weakrefs cancels their callbacks: nothing of the tracker outlives the region.
            self._finalizers.clear()
            self._live.clear()
            self._freed_since_peak.clear()
            super().__exit__(*exc)

    def track(self, tensors: Iterable[torch.Tensor], is_state: bool = False) -> None:
        """Count tensors that exist before the region and that `state_tensors` does not yield (an input batch)."""
        for tensor in tensors:
            self._see(tensor, is_new=True, is_state=is_state)

    def reclassify(self) -> None:
        """Mark as state the storages `state_tensors` yields now: gradients and optimizer state made in the region."""
        if self._state_tensors is not None:
            self.track(self._state_tensors(), is_state=True)

    def summary(self) -> Dict[str, int]:
        return {
            "peak_tensor_bytes": self.peak_bytes,
            "peak_state_bytes": self.state_bytes_at_peak,
            "peak_other_bytes": self.other_bytes_at_peak,
        }

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        is_new = self._new_storage_ops.get(func)
        if is_new is None:
            is_new = self._new_storage_ops[func] = _returns_new_storage(func)
        for tensor in _tensors_in(output):
            self._see(tensor, is_new=is_new, is_state=False)
        return output

    def _see(self, tensor: torch.Tensor, is_new: bool, is_state: bool) -> None:
        tensor = local_view(tensor)  # a DTensor's bytes here are its shard's (hardware=fsdp)
        if tensor.layout is not torch.strided or tensor.device.type == "meta":
            return
        if not self._counts_device(tensor.device):
            return
        storage = tensor.untyped_storage()
        known = self._live.get(id(storage))
        if known is None:
            if is_new:
                self._register(storage, is_state)
        elif known.nbytes != storage.nbytes():  # resized in place (resize_, out= arguments)
            self._release(id(storage))
            self._register(storage, known.is_state or is_state)
        elif is_state:
            known.is_state = True

    def _counts_device(self, device: torch.device) -> bool:
        if self._device is None:
            return True
        return device.type == self._device.type and self._device.index in (None, device.index)

    def _register(self, storage: torch.UntypedStorage, is_state: bool) -> None:
        key = id(storage)
        self._registered += 1
        # Replacing the weakref of a resized storage cancels the old one's callback.
        self._finalizers[key] = weakref.ref(storage, partial(self._on_storage_freed, key))
        self._live[key] = _Storage(storage.nbytes(), self._registered, is_state)
        self.live_bytes += storage.nbytes()
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes
            self._peak_born = self._registered
            self._freed_since_peak.clear()

    def _on_storage_freed(self, key: int, _ref: weakref.ref) -> None:
        del self._finalizers[key]
        self._release(key)

    def _release(self, key: int) -> None:
        storage = self._live.pop(key)
        self.live_bytes -= storage.nbytes
        if storage.born <= self._peak_born:
            self._freed_since_peak.append(storage)

    def _live_at_peak(self) -> Iterator[_Storage]:
        yield from self._freed_since_peak
        yield from (s for s in self._live.values() if s.born <= self._peak_born)


def measure_steps(
    step_fn: Callable[[], object],
    n_steps: int,
    state_tensors: Optional[StateTensors] = None,
    device: Union[torch.device, str, None] = None,
) -> Dict[str, int]:
    """Run `step_fn` n_steps times under a tracker; the peak over all of them, and its split."""
    with TensorMemoryTracker(state_tensors, device) as tracker:
        for _ in range(n_steps):
            step_fn()
            tracker.reclassify()
    return tracker.summary()
