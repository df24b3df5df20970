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


@migration(
    "0001-keep-process-backend",
    since="0.2.0",
    description="write VM_BACKEND=process when the config sets no VM_BACKEND, so the VMs "
    "of a 0.1.0 server keep running on the backend they were made with (the default "
    "is now nspawn; docs/operations.md says how to move)",
)
def keep_process_backend(config: ConfigFile) -> None:
    # 0.1.0 had only stand-in guests and set no VM_BACKEND: without this line
    # the new default would start scaleboxd on nspawn, which cannot adopt them,
    # and whose packages and template 0.1.0's install.sh never set up.
    config.add(
        "VM_BACKEND",
        "process",
        comment="Kept by the 0.2.0 update: VMs made before it are stand-in processes. "
        "To move to real containers see docs/operations.md, 'Moving to the nspawn backend'.",
    )
