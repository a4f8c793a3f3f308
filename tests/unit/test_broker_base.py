"""Helpers in ``infeed.brokers.base`` that every backend shares."""

from __future__ import annotations

import math

import pytest

from infeed.brokers.base import check_trim_limits


@pytest.mark.parametrize(
    ("max_age_s", "max_messages"),
    [(None, None), (0.0, 0), (3600.0, None), (None, 10), (math.inf, 1)],
)
def test_check_trim_limits_accepts_absent_and_non_negative_limits(
    max_age_s: float | None, max_messages: int | None
) -> None:
    check_trim_limits(max_age_s=max_age_s, max_messages=max_messages)


@pytest.mark.parametrize(
    ("max_age_s", "max_messages", "message"),
    [
        (-1.0, None, "max_age_s must be >= 0, got -1.0"),
        (math.nan, None, "max_age_s must be >= 0, got nan"),
        (None, -3, "max_messages must be >= 0, got -3"),
        (-1.0, -3, "max_age_s must be >= 0, got -1.0"),
    ],
)
def test_check_trim_limits_names_the_bad_value(
    max_age_s: float | None, max_messages: int | None, message: str
) -> None:
    with pytest.raises(ValueError, match=f"^{message}$"):
        check_trim_limits(max_age_s=max_age_s, max_messages=max_messages)
