"""The ``chaos`` marker: tests too long for the default suite (minutes of repeated 2-process runs).
They are deselected (listed as deselected, never skipped) unless the ``-m`` expression names
``chaos`` or GRPO_CHAOS=1 is set:

    .venv/bin/python -m pytest -m chaos tests/reliability/test_rel_chaos.py
"""
import os


def pytest_configure(config):
    config.addinivalue_line("markers", "chaos: minutes-long kill/resume runs; deselected unless -m names "
                                       "chaos or GRPO_CHAOS=1 (see docs/reliability.md)")


def _chaos_requested(config) -> bool:
    return "chaos" in (config.getoption("markexpr", "") or "") or os.environ.get("GRPO_CHAOS") == "1"


def pytest_collection_modifyitems(config, items):
    if _chaos_requested(config):
        return
    chaos = [item for item in items if item.get_closest_marker("chaos")]
    if chaos:
        config.hook.pytest_deselected(items=chaos)
        items[:] = [item for item in items if not item.get_closest_marker("chaos")]
