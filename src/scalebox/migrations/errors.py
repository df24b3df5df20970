"""Errors of the migrations and their runner."""

from __future__ import annotations

from scalebox.errors import ScaleboxError


class MigrationError(ScaleboxError):
    """The config or the state file cannot be read or written, or a migration misbehaved."""


class MigrationFailed(MigrationError):
    """One migration raised: the runner stopped there, the updater rolls back."""

    def __init__(self, migration_id: str, message: str) -> None:
        super().__init__(
            f"migration {migration_id} failed: {message}",
            "the update is rolled back; report this to the release's publisher",
        )
        self.migration_id = migration_id
        self.message = message
