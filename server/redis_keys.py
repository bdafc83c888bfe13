"""Every Redis key, channel and prefix this project uses, in one place.

The strings are a data format: a running deployment holds keys of these exact names, so
they never change (tests pin them).

Per workflow, all under the hash tag `{<workflow_id>}`, so that one Lua script touches
them all and, on Redis Cluster, they and the workflow's channel live on one shard. Each
append re-sets the expiry of every one of them to RETENTION_SECONDS:
- `wf:{<id>}:events`    stream: the events, the source of truth for replay (MAXLEN).
- `wf:{<id>}:trimmed`   string: the newest id MAXLEN trimmed away.
- `wf:{<id>}:idem`      hash: idempotency key -> the id it was first stored under.
- `wf:{<id>}:idemq`     list: those keys in stored order (the oldest are forgotten first).
- `wf:{<id>}:progress`  hash: `ver` (appends so far), `last` (last id), `shown` (what a
                        poll showed), and the fold state in parts: `meta`, `plan`,
                        `n:<node id>` (see server.progress.parts).
- `wf:{<id>}:live`      pub/sub channel (SPUBLISH on a cluster): the stored events, and
                        what an append wrote to the progress hash (see lua/append.lua).

Run index (server.overview.runs), split over shards whose hash tag is `{wfsse:runs:<k>}`
(one shard on a single Redis, SHARDS_CLUSTER on a cluster): per shard `all`, the filter
sets `s:<state>`, `d:<definition>`, `d:<definition>:s:<state>` (the scripts name them from
the tag) and the records hash `rec`; entries older than RETENTION_SECONDS are dropped by
the scripts. A shard's notices go on the live channel of the pseudo workflow id
`wfsse:runs:<k>` (`wf:{wfsse:runs:<k>}:live`), in the shard's slot, a name no workflow
can have (a workflow id holds no `:`).

Watchers (server.streams.watchers), one hash tag `{wfsse:watchers}` (one slot: a write per
process per second): per process the hash `{wfsse:watchers}:p:<process id>` (TTL 5 s
after its last report), and the sorted set `{wfsse:watchers}:procs` naming them (a process
silent for 60 s is pruned).

Duration history (server.progress.history), kept HISTORY_TTL_SECONDS after its last
update: `wfsse:hist:def:<sha256 of the definition id>` (a client string is never part of a
key name), `wfsse:hist:types`, and beside each the recent record
`wfsse:hist:recent:{<that key>}` (the first key as hash tag: same slot, one script).

Per process: the fan-out hub's private channel `wfsse:hub:<pid>:<hub object id>`, which
keeps its pub/sub connection subscribed while no client is.

The original engine's channels (legacy ingest): `workflow:<instance id>:events`, read with
PSUBSCRIBE `workflow:*:events`; this project never writes them.

`prefix` arguments (default PREFIX) let tests keep their own keys apart.
"""

from __future__ import annotations

import hashlib

PREFIX = "wfsse"


# ---- Per workflow: hash tag `{<workflow_id>}`


def stream_key(workflow_id: str) -> str:
    """The stream: the source of truth for replay."""
    return f"wf:{{{workflow_id}}}:events"


def trimmed_key(workflow_id: str) -> str:
    """The newest id that MAXLEN trimmed away (Redis 7.0 does not track it for us)."""
    return f"wf:{{{workflow_id}}}:trimmed"


def idempotency_key(workflow_id: str) -> str:
    """Hash: idempotency_key -> the id it was first stored under."""
    return f"wf:{{{workflow_id}}}:idem"


def idempotency_order_key(workflow_id: str) -> str:
    """List: the idempotency keys in the order stored, so the oldest can be forgotten."""
    return f"wf:{{{workflow_id}}}:idemq"


def progress_key(workflow_id: str) -> str:
    """Hash: `ver` (appends so far), `last` (last id), `shown`, and the fold state's parts."""
    return f"wf:{{{workflow_id}}}:progress"


def channel(workflow_id: str) -> str:
    """Pub/sub channel of a workflow's live events, in blocks of SSE frames (see
    server/lua/append.lua), and of what its appends wrote to the progress hash."""
    return f"wf:{{{workflow_id}}}:live"


def workflow_keys(workflow_id: str) -> list[str]:
    """All keys of one workflow, in the order the append script takes them as KEYS."""
    return [
        stream_key(workflow_id),
        trimmed_key(workflow_id),
        idempotency_key(workflow_id),
        progress_key(workflow_id),
        idempotency_order_key(workflow_id),
    ]


def workflow_keys_match(id_pattern: str) -> str:
    """A SCAN MATCH pattern for the keys of the workflows whose id matches `id_pattern`."""
    return f"wf:{{{id_pattern}}}:*"


# ---- Run index: hash tag `{<prefix>:runs:<k>}` per shard


def runs_shard_tag(k: int, *, prefix: str = PREFIX) -> str:
    """A shard's hash tag, which every key of the shard starts with."""
    return f"{{{prefix}:runs:{k}}}"


def runs_keys(k: int, *, prefix: str = PREFIX) -> list[str]:
    """A shard's `all` sorted set and `rec` hash (its scripts name the filter sets)."""
    tag = runs_shard_tag(k, prefix=prefix)
    return [f"{tag}:all", f"{tag}:rec"]


def runs_notice_id(k: int, *, prefix: str = PREFIX) -> str:
    """The pseudo workflow id whose live channel carries the shard's notices (a new run, a
    changed state): `channel()` of it shares the shard's slot, and no real workflow can
    have it (a `:` is not allowed in a workflow id)."""
    return f"{prefix}:runs:{k}"


# ---- Watchers: hash tag `{<prefix>:watchers}`


def _watchers_tag(prefix: str) -> str:
    return f"{{{prefix}:watchers}}"


def watcher_procs_key(*, prefix: str = PREFIX) -> str:
    """Sorted set: the process ids that reported recently, scored by their last report (ms)."""
    return f"{_watchers_tag(prefix)}:procs"


def watcher_process_key(process_id: str, *, prefix: str = PREFIX) -> str:
    """Hash: one process's open streams per workflow id."""
    return f"{_watchers_tag(prefix)}:p:{process_id}"


# ---- Duration history: `<prefix>:hist:*`


def history_definition_key(definition_id: str, *, prefix: str = PREFIX) -> str:
    """Key of a definition's per-node hash; the client string is hashed, never embedded."""
    digest = hashlib.sha256(definition_id.encode()).hexdigest()
    return f"{prefix}:hist:def:{digest}"


def history_types_key(*, prefix: str = PREFIX) -> str:
    """Key of the per-node_type hash shared by all definitions."""
    return f"{prefix}:hist:types"


def history_recent_key(key: str, *, prefix: str = PREFIX) -> str:
    """Key of the recent record beside log-stats hash `key`: `key` is its hash tag, so the
    two share a Redis Cluster slot (and one script call)."""
    return f"{prefix}:hist:recent:{{{key}}}"


# ---- Per process


def hub_control_channel(pid: int, hub_id: int) -> str:
    """A fan-out hub's private channel: keeps its pub/sub connection subscribed."""
    return f"{PREFIX}:hub:{pid}:{hub_id}"


# ---- The original engine's channels (legacy ingest reads them)

LEGACY_CHANNEL_PREFIX, LEGACY_CHANNEL_SUFFIX = "workflow:", ":events"
LEGACY_CHANNEL_PATTERN = f"{LEGACY_CHANNEL_PREFIX}*{LEGACY_CHANNEL_SUFFIX}"
