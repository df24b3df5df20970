"""How scalebox-update words an error for a person: never Python's "[Errno N]" form."""

from __future__ import annotations

from pathlib import Path

import pytest

from scalebox.errors import ConfigError
from scalebox.update.errors import RollbackFailed, reason_of


def test_an_os_error_reads_as_its_cause_and_file(tmp_path: Path) -> None:
    missing = tmp_path / "releases" / "0.1.0"
    with pytest.raises(OSError) as caught:  # a real one, from the kernel
        missing.read_text()
    text = reason_of(caught.value)
    assert text == f"No such file or directory: {missing}"
    assert "Errno" not in text


def test_an_update_error_reads_as_its_what_and_anything_else_names_its_kind() -> None:
    assert reason_of(RollbackFailed("the old release did not start", "run X")) == (
        "the old release did not start"
    )
    assert reason_of(ValueError("bad")) == "ValueError: bad"


def test_any_error_made_for_a_person_reads_as_its_what() -> None:
    """A ConfigError from the switch (the socket's port) read "ConfigError: ...\n  hint: ..."
    in the rollback's message and the history."""
    error = ConfigError("API_PORT=http is not a port", "set API_PORT to a number")
    assert reason_of(error) == "API_PORT=http is not a port"
