"""Peak of the tensors a piece of code allocates, on the CPU: every tensor an operator returns is counted from
its storage's birth to its death (a TorchDispatchMode sees every operator, forward and backward, and a weakref
on the storage sees it freed). Tensors that existed before are not counted. Operator-internal scratch space that
never becomes a tensor is invisible, as it is to autograd."""
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakAllocation(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._count(tensor.untyped_storage())
        return out

    def _count(self, storage):
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self._seen:
            return  # an in-place result or a view of a storage already counted
        self._seen.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, size)

    def _free(self, key, size):
        self.live -= size
        self._seen.discard(key)


def peak_bytes(fn) -> int:
    mode = PeakAllocation()
    with mode:
        fn()
    return mode.peak
