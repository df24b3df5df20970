"""Helpers for the CLI tests: an isolated HOME, a port nobody answers on, a runner."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from scalebox.cli.main import cli


@dataclass
class Cli:
    """Runs `scalebox ARGS` in-process with an environment that sees only ``home``."""

    home: Path
    env: dict[str, str | None] = field(default_factory=dict)

    def __call__(self, *args: str, input: str | None = None, **env: str | None) -> Result:
        runner = CliRunner()
        merged = {**self.env, **env}
        return runner.invoke(cli, list(args), input=input, env=merged, catch_exceptions=False)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture
def scalebox(home: Path) -> Cli:
    # Nothing from the developer's own environment or ~/.config may leak in.
    return Cli(
        home,
        {
            "HOME": str(home),
            "XDG_CONFIG_HOME": None,
            "SCALEBOX_URL": None,
            "SCALEBOX_TOKEN": None,
        },
    )


@pytest.fixture
def dead_url() -> Iterator[str]:
    """A loopback URL that refuses connections: the port is bound but never listened on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
