"""Ray actors: placement groups, expert-parallel workers, the expert router, the replica driver."""
