"""What every step needs from the outside world, passed in one frozen object."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import httpx

from scalebox import config
from scalebox.errors import ConfigError
from scalebox.update.paths import Paths
from scalebox.update.systemd import ServiceManager

DEFAULT_STABILITY_WINDOW = 5.0


@dataclass(frozen=True)
class Context:
    paths: Paths
    service: ServiceManager
    http: httpx.Client  # loopback only: the /health probes
    report: Callable[[str], None]  # one progress line, to stderr
    stability_window: float = DEFAULT_STABILITY_WINDOW
    restart_timeout: float = 90.0
    verify_timeout: float = 60.0
    python: str = "python3"

    def health_url(self) -> str:
        """/health on the API port of the live config (default 8080)."""
        port = "8080"
        try:
            values = config.parse_lines(self.paths.config.read_text(), str(self.paths.config))
            port = values.get("API_PORT", (port, ""))[0] or port
        except (OSError, ConfigError):
            pass  # the release's own config check reports a broken config
        return f"http://127.0.0.1:{port}/health"
