"""Ray placement of one EP group: one bundle per rank (one GPU each, or one CPU on CPU), PACK or SPREAD.

Inside Ray Serve the replica's placement group comes from `placement_group_bundles` (bundle 0 is the replica
itself); standalone (CLI, tests) EPGroup creates its own. Nothing here runs the model.
"""
from __future__ import annotations

import ray
from ray.util.placement_group import PlacementGroup, get_current_placement_group, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


def rank_bundle(device: str) -> dict[str, float]:
    """One GPU (and a CPU to drive it) per rank; on CPU half a logical CPU, so a 2-rank replica fits a 2-core
    machine with Ray's default CPU count (ranks share the cores either way)."""
    return {"GPU": 1, "CPU": 1} if device == "cuda" else {"CPU": 0.5}


def replica_bundle(device: str) -> dict[str, float]:
    """The ModelServer replica itself: it only drives the ranks."""
    return {"CPU": 1} if device == "cuda" else {"CPU": 0.1}


def serve_bundles(ep_size: int, device: str) -> list[dict[str, float]]:
    """Serve `placement_group_bundles` for a ModelServer replica: its own bundle, then one per rank."""
    return [replica_bundle(device)] + [rank_bundle(device) for _ in range(ep_size)]


def group_placement(ep_size: int, device: str, strategy: str, timeout_s: float = 60.0
                    ) -> tuple[PlacementGroup, int]:
    """(placement group, index of rank 0's bundle): the current replica's group when running inside one
    (Serve), else a new group of `ep_size` rank bundles. PACK keeps ranks on one node (NVLink) when they fit,
    SPREAD puts them on different nodes."""
    current = get_current_placement_group()
    if current is not None:
        return current, 1
    pg = placement_group([rank_bundle(device) for _ in range(ep_size)], strategy=strategy)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        ray.util.remove_placement_group(pg)
        raise RuntimeError(f"could not place {ep_size} EP ranks ({rank_bundle(device)} each, {strategy}) within "
                           f"{timeout_s:.0f}s: the cluster lacks the resources")
    return pg, 0


def on_bundle(pg: PlacementGroup, index: int) -> PlacementGroupSchedulingStrategy:
    return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=index,
                                            placement_group_capture_child_tasks=True)
