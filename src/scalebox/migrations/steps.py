"""This release's migrations, in the order they run. Append new ones at the end.

Each is a small function of the config (``ConfigFile``) that is idempotent:
run twice, it changes the file once. ``since`` is the release that ships it.
Example (see CONTRIBUTING.md, "Writing a migration")::

    @migration(
        "0001-add-metrics-port",
        since="0.3.0",
        description="add METRICS_PORT=9100 (its default), so operators see the new key",
    )
    def add_metrics_port(config: ConfigFile) -> None:
        config.add("METRICS_PORT", "9100", comment="Port of the metrics endpoint (default 9100).")
"""

from __future__ import annotations

from scalebox.migrations.configfile import ConfigFile
from scalebox.migrations.registry import migration

__all__ = ["ConfigFile", "migration"]  # what a migration below uses

# No migrations yet: every key so far has a default, so no config needs changing.
