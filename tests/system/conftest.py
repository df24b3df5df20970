"""Fixtures that boot real systemd machines (tools/machine.py) for the system tests.

``machine`` yields a freshly booted Debian 12 machine (systemd as PID 1, its
own network namespace, a volatile overlay), torn down after the test however
it ends. ``boot_machine(release_dir=...)`` boots more, e.g. with a folder bound
read-only at /mnt/release. Every test in tests/system is marked ``system``;
without root the fixtures skip with the reason, so a skip is never a pass.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tools.machine as machine_mod
from tools.machine import Machine

BootMachine = Callable[..., Machine]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.system)


def _skip_unless_able() -> None:
    if os.geteuid() != 0:
        pytest.skip(
            "system test: needs root to boot an nspawn machine (try: sudo ./do system-tests)"
        )
    missing = [t for t in ("systemd-nspawn", "debootstrap", "ip", "nsenter") if not shutil.which(t)]
    if missing:
        pytest.skip(f"system test: missing {', '.join(missing)} (./do system-tests installs them)")


@pytest.fixture
def boot_machine() -> Iterator[BootMachine]:
    """A function that boots a machine; all of them are torn down after the test."""
    _skip_unless_able()
    with contextlib.ExitStack() as stack:

        def boot(release_dir: Path | None = None, *, persistent: bool = False) -> Machine:
            return stack.enter_context(Machine.boot(release_dir, persistent=persistent))

        yield boot


@pytest.fixture
def machine(boot_machine: BootMachine) -> Machine:
    """One freshly booted machine, torn down after the test."""
    return boot_machine()


@pytest.fixture(scope="module")
def module_boot_machine() -> Iterator[BootMachine]:
    """Like boot_machine, for machines that every test of a module shares."""
    _skip_unless_able()
    with contextlib.ExitStack() as stack:

        def boot(release_dir: Path | None = None) -> Machine:
            return stack.enter_context(Machine.boot(release_dir))

        yield boot


# The update tests' fixtures (releases once per session, a server with A installed).
from .update_helpers import releases, server  # noqa: E402, F401


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed system test's report carries the journal of every machine still up.

    They are torn down (their journals with them) right after; without this a
    failure in systemd (a unit that would not start) could not be named later.
    """
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if report.failed and call.when in ("setup", "call"):
        for m in machine_mod.LIVE:
            report.sections.append((f"journal of {m.name} (last lines)", m.journal()))
