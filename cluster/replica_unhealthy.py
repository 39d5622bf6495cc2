"""ReplicaUnhealthy: the error a model replica's requests end with when its EP group failed. Its own module, free
of torch and the engine, so the gateway can recognise it without importing either."""


class ReplicaUnhealthy(RuntimeError):
    """The EP group failed; Serve restarts the replica, other replicas keep serving."""
