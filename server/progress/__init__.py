"""Progress: the fold of events into state, how that state is stored, the ETA, and what
a poll shows. Pure functions, no I/O (the clock is passed in); `service` and `history`
are the parts that talk to Redis.

    fold.py      events -> FoldState (node states, plan, counts)
    codec.py     FoldState <-> the bytes kept in Redis
    estimate.py  the ETA: simulated futures of the remaining DAG
    snapshot.py  the progress object a poll answers, with the smoothed finish time
    history.py   the per-definition and per-node-type duration history (Redis)
    service.py   ProgressService: cached fold state per workflow, snapshots on demand
"""

from server.progress.codec import (
    dumps_meta,
    dumps_node,
    dumps_plan,
    dumps_state,
    loads_parts,
    loads_state,
    touched_nodes,
)
from server.progress.estimate import MIN_REMAINING, Forecast, eta, expected_remaining, forecast
from server.progress.fold import (
    COMPLETED,
    FAILED,
    PENDING,
    RUNNING,
    SKIPPED,
    STATUSES,
    FoldState,
    NodeState,
    fold,
    history_items,
    history_keys,
    new_state,
    node_types,
    starts_clock,
)
from server.progress.snapshot import (
    Shown,
    dumps_shown,
    format_epoch,
    loads_shown,
    schedule_nodes,
    snapshot,
)

__all__ = [
    "COMPLETED",
    "FAILED",
    "MIN_REMAINING",
    "PENDING",
    "RUNNING",
    "SKIPPED",
    "STATUSES",
    "FoldState",
    "Forecast",
    "NodeState",
    "Shown",
    "dumps_meta",
    "dumps_node",
    "dumps_plan",
    "dumps_shown",
    "dumps_state",
    "eta",
    "expected_remaining",
    "fold",
    "forecast",
    "format_epoch",
    "history_items",
    "history_keys",
    "loads_parts",
    "loads_shown",
    "loads_state",
    "new_state",
    "node_types",
    "schedule_nodes",
    "snapshot",
    "starts_clock",
    "touched_nodes",
]
