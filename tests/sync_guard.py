"""HostSyncGuard: fails a test when the code under it calls a torch op that reads device data back to the host.

On CUDA such ops stall the host until the GPU catches up and cannot run inside a CUDA graph; on CPU they are
harmless, so CPU tests use this guard to show that a hot path would not sync on a GPU. It sees every aten op that
the wrapped code dispatches (TorchDispatchMode), including ones nested inside other ops' implementations.
"""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

SYNCING = {
    aten._local_scalar_dense.default,        # .item(), int(t), float(t), bool(t), .tolist() element reads
    aten.nonzero.default, aten.nonzero_static.default, aten.masked_select.default, aten.bincount.default,
    aten.unique_consecutive.default, aten._unique2.default, aten.unique_dim.default,
    aten.repeat_interleave.Tensor, aten.is_nonzero.default, aten.equal.default,
}


class HostSyncError(AssertionError):
    pass


# Tensor methods that read a CPU tensor's memory directly, without dispatching an op the mode could see.
_READBACK_METHODS = ("tolist", "cpu", "numpy")


class HostSyncGuard(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0                                         # ops seen: a guard that saw nothing proves nothing
        self._saved = {}

    def __enter__(self):
        for name in _READBACK_METHODS:
            self._saved[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, _refuse(name))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, method in self._saved.items():
            setattr(torch.Tensor, name, method)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        kwargs = kwargs or {}
        if func in SYNCING and not (func is aten.repeat_interleave.Tensor and kwargs.get("output_size")):
            raise HostSyncError(f"{func} reads device data back to the host")
        if func is aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1]):
            raise HostSyncError("indexing with a boolean mask (its nonzero() reads back to the host)")
        if func in (aten.to.device, aten._to_copy.default) and kwargs.get("device") == torch.device("cpu"):
            raise HostSyncError(f"{func} copies to the host")
        return func(*args, **kwargs)


def _refuse(name):
    def method(self, *args, **kwargs):
        raise HostSyncError(f"Tensor.{name}() reads device data back to the host")
    return method
