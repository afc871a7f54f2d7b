"""Peak of the tensors a piece of code allocates, on the CPU: every tensor an operator returns is counted from
its storage's birth to its death (a TorchDispatchMode sees every operator, forward and backward, and a weakref
on the storage sees it freed). Tensors that existed before are not counted, nor are views of them: a frozen
weight's transpose shares the weight's storage, and counting it added every linear weight of the model to the
step. Tensors an operator makes and frees inside itself are invisible, with one exception counted by hand:
logsumexp (the fused loss's) computes (x - max).exp() as a full-size tensor inside the operator (torch.profiler
shows it as aten::sub under aten::logsumexp; the code is the same on CUDA), alive beside its input."""
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
        if func is torch.ops.aten.logsumexp.default:
            self.peak = max(self.peak, self.live + args[0].numel() * args[0].element_size())
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        inputs = {t.untyped_storage().data_ptr() for t in tensors}
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._count(tensor.untyped_storage(), inputs)
        return out

    def _count(self, storage, inputs):
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self._seen or key in inputs:
            return  # in place or a view: of a storage already counted, or of one that existed before
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
