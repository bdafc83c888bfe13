"""The Redis key names are a data format: a running deployment holds keys of exactly these
names, so a change here is a migration, not a refactoring."""

from __future__ import annotations

import hashlib

from server import redis_keys as k


def test_every_key_and_channel_name_is_pinned_byte_for_byte() -> None:
    assert k.workflow_keys("w-1") == [
        "wf:{w-1}:events",
        "wf:{w-1}:trimmed",
        "wf:{w-1}:idem",
        "wf:{w-1}:progress",
        "wf:{w-1}:idemq",
    ]
    assert k.stream_key("w-1") == "wf:{w-1}:events"
    assert k.trimmed_key("w-1") == "wf:{w-1}:trimmed"
    assert k.idempotency_key("w-1") == "wf:{w-1}:idem"
    assert k.idempotency_order_key("w-1") == "wf:{w-1}:idemq"
    assert k.progress_key("w-1") == "wf:{w-1}:progress"
    assert k.channel("w-1") == "wf:{w-1}:live"
    assert k.workflow_keys_match("run-*") == "wf:{run-*}:*"
    assert k.runs_shard_tag(3) == "{wfsse:runs:3}"
    assert k.runs_keys(3) == ["{wfsse:runs:3}:all", "{wfsse:runs:3}:rec"]
    assert k.runs_notice_id(3) == "wfsse:runs:3"
    assert k.channel(k.runs_notice_id(3)) == "wf:{wfsse:runs:3}:live"
    assert k.watcher_procs_key() == "{wfsse:watchers}:procs"
    assert k.watcher_process_key("h-1-x") == "{wfsse:watchers}:p:h-1-x"
    digest = hashlib.sha256(b"def").hexdigest()
    assert k.history_definition_key("def") == f"wfsse:hist:def:{digest}"
    assert k.history_types_key() == "wfsse:hist:types"
    assert k.history_recent_key("wfsse:hist:types") == "wfsse:hist:recent:{wfsse:hist:types}"
    assert k.hub_control_channel(12, 34) == "wfsse:hub:12:34"
    assert k.LEGACY_CHANNEL_PATTERN == "workflow:*:events"
    assert (k.LEGACY_CHANNEL_PREFIX, k.LEGACY_CHANNEL_SUFFIX) == ("workflow:", ":events")


def test_a_prefix_moves_the_project_keys_but_not_a_workflow_s() -> None:
    assert k.runs_shard_tag(0, prefix="p") == "{p:runs:0}"
    assert k.watcher_procs_key(prefix="p") == "{p:watchers}:procs"
    assert k.history_types_key(prefix="p") == "p:hist:types"
