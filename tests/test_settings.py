"""Settings from the environment and flags."""

from __future__ import annotations

import argparse

import pytest

from server import settings


def test_access_log_is_off_by_default_and_on_by_variable_or_flag() -> None:
    assert settings.from_sources({}).access_log is False
    assert settings.from_sources({"ACCESS_LOG": "1"}).access_log is True
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser)
    flags = vars(parser.parse_args(["--access-log"]))
    assert settings.from_sources({"ACCESS_LOG": "0"}, flags).access_log is True
    flags = vars(parser.parse_args(["--access-log", "0"]))
    assert settings.from_sources({"ACCESS_LOG": "1"}, flags).access_log is False


# Every variable of the SPEC's Configuration section, a value other than its default for
# the environment and another for the flag.
SPEC_VARIABLES = {
    "HOST": ("0.0.0.0", "::1", "::1"),
    "PORT": ("9001", "9002", 9002),
    "REDIS_URL": ("redis://a:6379/0", "redis://b:6379/1", "redis://b:6379/1"),
    "HEARTBEAT_SECONDS": ("5", "2.5", 2.5),
    "RETRY_MS": ("1000", "250", 250),
    "HISTORY_MAXLEN": ("50", "70", 70),
    "RETENTION_SECONDS": ("60", "90", 90),
    "MAX_BODY_BYTES": ("1000", "2000", 2000),
    "MAX_EVENT_BYTES": ("100", "200", 200),
    "MAX_STREAMS": ("10", "20", 20),
    "PUBLISH_TOKEN": ("env-token", "flag-token", "flag-token"),
    "SUBSCRIBE_SECRET": ("env-secret", "flag-secret", "flag-secret"),
    "CORS_ORIGINS": (
        "https://a.example",
        "https://b.example, https://c.example",
        ("https://b.example", "https://c.example"),
    ),
    "WORKERS": ("3", "auto", "auto"),
    "LEGACY_INGEST": ("0", "1", True),
}


def test_every_spec_variable_is_a_flag_and_the_flag_wins() -> None:
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser)
    env = {name: env_value for name, (env_value, _, _) in SPEC_VARIABLES.items()}
    argv: list[str] = []
    for name, (_, flag_value, _) in SPEC_VARIABLES.items():
        argv += ["--" + name.lower().replace("_", "-"), flag_value]
    got = settings.from_sources(env, vars(parser.parse_args(argv)))
    for name, (_, _, expected) in SPEC_VARIABLES.items():
        assert getattr(got, name.lower()) == expected, name
    from_env = settings.from_sources(env)
    assert (from_env.retry_ms, from_env.max_streams, from_env.workers) == (1000, 10, "3")


@pytest.mark.parametrize("prefix", ["", "a{b", "a}b", "a:b", "a b", "x" * 65])
def test_a_history_prefix_that_would_break_the_key_scheme_is_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match="HISTORY_PREFIX"):
        settings.Settings(history_prefix=prefix)
