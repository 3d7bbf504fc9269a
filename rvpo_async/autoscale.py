"""The judge pool's autoscale rule (actors.judges.pool applies it). Pure: no Ray."""

from __future__ import annotations


def autoscale_target(queue_depth: int, in_flight: int, num_workers: int, min_workers: int, max_workers: int,
                     per_worker_capacity: int) -> int:
    """Workers needed to run all outstanding samples at full per-worker concurrency, within bounds.
    Grows at once (a backlog adds staleness to every waiting sample) but shrinks one worker per call
    (a burst often comes back, and a new worker takes seconds to start)."""
    if per_worker_capacity < 1:
        raise ValueError(f"per_worker_capacity must be >= 1, got {per_worker_capacity}")
    needed = -(-(queue_depth + in_flight) // per_worker_capacity)
    if needed < num_workers:
        needed = num_workers - 1
    return max(min_workers, min(max_workers, needed))
