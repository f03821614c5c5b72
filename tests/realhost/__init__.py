"""Helpers of the real-kernel host tests."""
from __future__ import annotations

import os

import pytest


def in_ci() -> bool:
    """CI=true (or 1/yes): a green run must mean the real initiator ran."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def unavailable(why: str):
    """The guest cannot start here: skip on a developer machine, FAIL under CI."""
    msg = "real-kernel host unavailable: " + why
    if in_ci():
        pytest.fail(msg + " (CI=true: the real-kernel tests must run in CI)", pytrace=False)
    pytest.skip(msg)
