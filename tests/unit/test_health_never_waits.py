"""/health answers on the event loop itself: never behind the worker threads.

The API's handlers that touch VMs are plain functions, run in anyio's worker
threads (40 at most). /health is what the updater's stability window, the
bench and a load balancer ask; had it waited for a worker, 40 slow requests
(VM creations waiting on a slow `systemctl start`) would have made a healthy
daemon look dead, and each answer paid a thread hop (half of its CPU).

The VM service here is a stand-in that blocks every caller until released: a
real one blocks only while systemd is slow, which cannot be arranged on cue.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import anyio.to_thread
import httpx

from scalebox import config as config_module
from scalebox.daemon.app import create_app


class BlockingService:
    """Every VM list waits until ``release`` is set (a stand-in, see the module's doc)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.waiting = 0
        self._lock = threading.Lock()

    def list_vms(self) -> list[Any]:
        with self._lock:
            self.waiting += 1
        self.release.wait(30)
        return []


def test_health_answers_while_every_worker_thread_is_busy() -> None:
    token = "sb-" + "a" * 48
    config = config_module.parse(f"API_TOKEN={token}\nDATA_DIR=/nonexistent\n", "test config", {})
    service = BlockingService()
    app = create_app(config, service, logging.getLogger("test"))  # type: ignore[arg-type]

    workers = 0

    async def scenario() -> tuple[int, int, float]:
        nonlocal workers
        workers = int(anyio.to_thread.current_default_thread_limiter().total_tokens)  # 40
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            headers = {"Authorization": f"Bearer {token}"}
            busy = [
                asyncio.create_task(client.get("/vms", headers=headers)) for _ in range(workers)
            ]
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while service.waiting < workers and loop.time() < deadline:
                await asyncio.sleep(0.01)
            started = loop.time()
            try:
                health = await asyncio.wait_for(client.get("/health"), 5)
            finally:
                service.release.set()
            took = loop.time() - started
            answers = await asyncio.gather(*busy)
            assert all(a.status_code == 200 for a in answers)
            return service.waiting, health.status_code, took

    waiting, status, took = asyncio.run(scenario())
    assert waiting == workers > 0  # every worker thread was taken
    assert status == 200
    assert took < 1.0
