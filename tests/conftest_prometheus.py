"""Pytest plugin exposing the real Prometheus + Pushgateway fixtures to the whole suite.

tests/ is not a package (modules import each other by name), so tests/conftest.py imports it:

    # Real Prometheus + Pushgateway (session-scoped; see tests/prometheus_server.py)
    from conftest_prometheus import prometheus, pushgateway  # noqa: F401
"""

from prometheus_server import prometheus, pushgateway  # noqa: F401

__all__ = ["prometheus", "pushgateway"]
