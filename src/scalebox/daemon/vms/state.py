"""state.json: the saved list of VMs, written atomically after every change.

Format: ``{"format": 1, "vms": [record, ...]}`` with records from
``VM.to_record``. Each VM's directory also holds ``vm.json`` (the same
record): the guest reads its port from it, and a corrupt state.json is
rebuilt from these copies instead of losing the VMs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from scalebox.daemon.vms.models import VM, RecordError
from scalebox.fsutil import atomic_write, durable_copy

STATE_FORMAT = 1
VM_RECORD_NAME = "vm.json"


@dataclass(frozen=True)
class Loaded:
    """What ``load`` found. ``problem`` is set when the file was unreadable."""

    vms: list[VM]
    problem: str | None = None
    kept_as: Path | None = None


def parse(text: str) -> list[VM]:
    """The VMs in a state file's text; ValueError says what is wrong."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
        raise ValueError(f"not a scalebox state file of format {STATE_FORMAT}")
    records = data.get("vms")
    if not isinstance(records, list):
        raise RecordError("'vms' is not a list")
    vms = [VM.from_record(record) for record in records]
    if len({vm.id for vm in vms}) != len(vms):
        raise ValueError("a VM id appears twice")
    return vms


def render(vms: list[VM]) -> str:
    records = [vm.to_record() for vm in sorted(vms, key=lambda vm: vm.created_at)]
    return json.dumps({"format": STATE_FORMAT, "vms": records}, indent=2) + "\n"


def load(path: Path) -> Loaded:
    """Read the state file. Missing: no VMs. Unreadable: copied aside, never deleted.

    The unreadable file stays in place until a good one replaces it
    atomically: if the daemon dies before that, the next start finds it
    corrupt again (and recovers again) instead of missing (which would make
    every VM an orphan).
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        return Loaded([])
    except (OSError, UnicodeDecodeError) as exc:
        problem = f"cannot be read ({exc})"
    else:
        try:
            return Loaded(parse(text))
        except ValueError as exc:
            problem = str(exc)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    kept = path.with_name(f"{path.name}.corrupt-{stamp}")
    durable_copy(path, kept)
    return Loaded([], problem=problem, kept_as=kept)


def save(path: Path, vms: list[VM]) -> None:
    atomic_write(path, render(vms), mode=0o600)


def write_vm_record(vm_dir: Path, vm: VM) -> None:
    atomic_write(vm_dir / VM_RECORD_NAME, json.dumps(vm.to_record(), indent=2) + "\n", mode=0o600)


def read_vm_record(vm_dir: Path) -> VM:
    """The VM saved in ``vm_dir/vm.json``; ValueError or OSError when it cannot be read."""
    try:
        record = json.loads((vm_dir / VM_RECORD_NAME).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{vm_dir / VM_RECORD_NAME} is not valid JSON ({exc})") from None
    return VM.from_record(record)
