"""How many cases a fuzz test runs, and under which Hypothesis settings (one definition)."""

from __future__ import annotations

from hypothesis import HealthCheck, settings


def fuzz(cases: int) -> settings:
    """Hypothesis settings for ``cases`` examples: no deadline (shared, busy cores), no
    example database, fixtures shared across examples allowed (servers are costly)."""
    return settings(
        max_examples=cases,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        database=None,
    )
