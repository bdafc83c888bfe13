"""Settings from the environment and flags: the access-log knob."""

from __future__ import annotations

import argparse

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
