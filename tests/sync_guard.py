"""HostSyncGuard: fails a test when the code under it calls a torch op that reads device data back to the host
(bench/host_syncs.py's HostSyncCounter, refusing instead of counting)."""
from bench.host_syncs import HostSyncCounter, HostSyncError

__all__ = ["HostSyncGuard", "HostSyncError"]


class HostSyncGuard(HostSyncCounter):
    def __init__(self):
        super().__init__(strict=True)
