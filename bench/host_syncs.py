"""HostSyncCounter: sees every torch op that reads device data back to the host, counting it or refusing it.

On CUDA such ops stall the host until the GPU catches up and cannot run inside a CUDA graph; on CPU they are
harmless, so CPU runs use this to show that a hot path would not sync on a GPU. It sees every aten op that the
wrapped code dispatches (TorchDispatchMode), including ones nested inside other ops' implementations, and the tensor
methods that read a CPU tensor's memory without an op. Benchmarks count (`syncs`); tests refuse (tests/sync_guard.py).
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


class HostSyncCounter(TorchDispatchMode):
    """`strict`: raise HostSyncError at the first read-back; else count them in `syncs` (what each was in
    `seen`). `ops`: ops seen (a counter that saw nothing proves nothing)."""

    def __init__(self, strict: bool = False):
        super().__init__()
        self.strict = strict
        self.ops = 0
        self.syncs = 0
        self.seen: list[str] = []
        self._saved = {}
        self._reading = False                                # inside a read-back method: counted once

    def __enter__(self):
        for name in _READBACK_METHODS:
            self._saved[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._read_back(name, self._saved[name]))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, method in self._saved.items():
            setattr(torch.Tensor, name, method)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        kwargs = kwargs or {}
        if func in SYNCING and not (func is aten.repeat_interleave.Tensor and kwargs.get("output_size")):
            self._sync(f"{func} reads device data back to the host")
        if func is aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1]):
            self._sync("indexing with a boolean mask (its nonzero() reads back to the host)")
        if func in (aten.to.device, aten._to_copy.default) and kwargs.get("device") == torch.device("cpu"):
            self._sync(f"{func} copies to the host")
        return func(*args, **kwargs)

    def _sync(self, what: str) -> None:
        if self._reading:
            return
        if self.strict:
            raise HostSyncError(what)
        self.syncs += 1
        self.seen.append(what)

    def _read_back(self, name, method):
        def read(tensor, *args, **kwargs):
            self._sync(f"Tensor.{name}() reads device data back to the host")
            self._reading = True
            try:
                return method(tensor, *args, **kwargs)
            finally:
                self._reading = False
        return read
