"""The daemon exports nothing through FastAPI's own OpenTelemetry (since FastAPI 0.165),
even when a tracer provider is set up in its process."""

from __future__ import annotations

import subprocess
import sys

# Run in a process of its own: OpenTelemetry's global provider can be set only
# once per process. Prints how often FastAPI asked the provider for a tracer.
_SCRIPT = """
import asyncio, logging
from opentelemetry import trace
from scalebox.config import ServerConfig
from scalebox.daemon import httpserver
from scalebox.daemon.app import create_app

asked = []

class Provider(trace.TracerProvider):
    def get_tracer(self, *args, **kwargs):
        asked.append(args)
        return trace.NoOpTracer()

trace.set_tracer_provider(Provider())
app = create_app(ServerConfig(api_token="t" * 32), object(), logging.getLogger("api"))
status = asyncio.run(httpserver._get(app, "/health", []))
print(status, len(asked))
"""


def test_a_tracer_provider_in_the_process_is_never_asked_for_a_tracer() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["200", "0"]
