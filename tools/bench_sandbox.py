"""Sandbox figures: time from POST /vms to a working `ssh ... true`, throughput, memory.

    .venv/bin/python -m tools.bench_sandbox [--runs 5] [--burst 10] [--json]

Boots one test server with VM_BACKEND=nspawn (tools/sandbox.py), then:

1. ``--runs`` times: POST /vms, then `ssh -p PORT user@HOST_IP true` with the
   real OpenSSH client inside the machine; the time from sending the POST to
   ssh's exit, and the daemon's own split (making the disk image vs booting
   to an SSH banner, from its "created VM" log line). Each VM is deleted
   after. The first run is reported apart: its boot reads the template from
   disk into the page cache.
2. ``--burst`` VMs created back to back (throughput), then, after 10 s idle,
   the memory of each: the proportional set size (Pss) of every process in
   its unit's cgroup plus its SSH forwarder; then all deleted, and what is
   left of them is counted (should be nothing).

Targets from issue 10: median < 1 s, worst < 2 s, < 50 MB per idle VM.
A benchmark, not a test: exits 0 when a target is missed, 1 when it cannot run.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from scalebox.errors import ScaleboxError
from tools.machine import sigterm_raises
from tools.sandbox import Sandbox, sandbox_server

MEDIAN_TARGET, WORST_TARGET, MEMORY_TARGET_MB = 1.0, 2.0, 50.0
SPLIT_RE = re.compile(r"in ([\d.]+) s \(disk ([\d.]+) s, boot to ssh ([\d.]+) s\)")

# Pss of every process in a unit's cgroup (v1 name=systemd or v2 hierarchy), in kB.
PSS_OF_UNIT = r"""
cg=$(systemctl show -p ControlGroup --value "$1")
for root in /sys/fs/cgroup/systemd /sys/fs/cgroup/unified /sys/fs/cgroup; do
  [ -d "$root$cg" ] && break
done
total=0
for pid in $(find "$root$cg" -name cgroup.procs -exec cat {} + 2>/dev/null); do
  kb=$(awk '/^Pss:/ {print $2}' "/proc/$pid/smaps_rollup" 2>/dev/null)
  total=$((total + ${kb:-0}))
done
echo "$total"
"""


def _split(s: Sandbox, vm_id: str) -> tuple[float, float] | None:
    log = s.sh(f"journalctl -u scaleboxd --no-pager -o cat | grep 'created VM {vm_id} '").stdout
    found = SPLIT_RE.search(log)
    return (float(found.group(2)), float(found.group(3))) if found else None


def create_and_ssh(s: Sandbox) -> dict[str, Any]:
    key = s.public_key()
    started = time.monotonic()
    created = s.api("POST", "/vms", json={"template": "debian-base", "ssh_public_key": key})
    answered = time.monotonic() - started
    if created.status_code != 201:
        raise ScaleboxError(f"POST /vms answered {created.status_code}: {created.text}")
    vm = created.json()
    done = s.ssh(vm["ssh_port"], "/root/one", "true")
    total = time.monotonic() - started
    if done.returncode != 0:
        raise ScaleboxError(f"ssh to {vm['id']} failed: {done.stderr.strip()}")
    split = _split(s, vm["id"])
    return {
        "vm": vm["id"], "port": vm["ssh_port"], "post_s": round(answered, 3),
        "ssh_true_s": round(total, 3),
        "disk_s": split[0] if split else None, "boot_s": split[1] if split else None,
    }  # fmt: skip


def delete(s: Sandbox, vm: dict[str, Any]) -> list[str]:
    answer = s.api("DELETE", f"/vms/{vm['vm']}")
    if answer.status_code != 204:
        raise ScaleboxError(f"DELETE {vm['vm']} answered {answer.status_code}: {answer.text}")
    return s.leftovers(vm["vm"], vm["port"])


def memory_mb(s: Sandbox, vm_id: str) -> float:
    kb = 0
    for unit in (f"scalebox-vm@{vm_id}.service", f"scalebox-ssh-{vm_id}.service"):
        kb += int(s.m.run(["bash", "-c", PSS_OF_UNIT, "pss", unit]).stdout.strip() or 0)
    return kb / 1024


def measure(s: Sandbox, runs: int, burst: int) -> dict[str, Any]:
    cold = create_and_ssh(s)
    left = delete(s, cold)
    timed = []
    for _ in range(runs):
        run = create_and_ssh(s)
        left += delete(s, run)
        timed.append(run)
    times = [run["ssh_true_s"] for run in timed]
    started = time.monotonic()
    made = [create_and_ssh(s) for _ in range(burst)]
    burst_s = time.monotonic() - started
    time.sleep(10)
    memory = [memory_mb(s, vm["vm"]) for vm in made]
    for vm in made:
        left += delete(s, vm)
    return {
        "cold": cold,
        "runs": timed,
        "median_s": round(statistics.median(times), 3),
        "worst_s": round(max(times), 3),
        "burst": {"vms": burst, "seconds": round(burst_s, 2),
                  "per_vm_s": round(burst_s / burst, 3) if burst else None},
        "idle_memory_mb": {"per_vm": [round(m, 1) for m in memory],
                           "median": round(statistics.median(memory), 1) if memory else None},
        "left_behind": left,
    }  # fmt: skip


def report(figures: dict[str, Any]) -> str:
    def mark(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    cold = figures["cold"]
    lines = [
        f"cold first VM: ssh true after {cold['ssh_true_s']:.2f} s "
        f"(disk {cold['disk_s']} s, boot {cold['boot_s']} s)"
    ]
    for n, run in enumerate(figures["runs"], start=1):
        lines.append(
            f"run {n}: POST answered {run['post_s']:.2f} s, ssh true after "
            f"{run['ssh_true_s']:.2f} s (disk {run['disk_s']} s, boot {run['boot_s']} s)"
        )
    median, worst = figures["median_s"], figures["worst_s"]
    memory = figures["idle_memory_mb"]["median"]
    burst = figures["burst"]
    lines += [
        f"POST /vms -> ssh true: median {median:.2f} s (target < {MEDIAN_TARGET:.0f} s) "
        f"{mark(median < MEDIAN_TARGET)}; worst {worst:.2f} s (target < {WORST_TARGET:.0f} s) "
        f"{mark(worst < WORST_TARGET)}",
        f"{burst['vms']} VMs in a row: {burst['seconds']:.1f} s ({burst['per_vm_s']} s each)",
        f"idle memory per VM (Pss, after 10 s): median {memory} MB "
        f"(target < {MEMORY_TARGET_MB:.0f} MB) "
        f"{mark(memory is not None and memory < MEMORY_TARGET_MB)}",
        f"left behind after the deletes: {figures['left_behind'] or 'nothing'}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_sandbox",
                                     description=__doc__.splitlines()[0])  # fmt: skip
    parser.add_argument("--runs", type=int, default=5, choices=range(1, 51), metavar="N")
    parser.add_argument("--burst", type=int, default=10, choices=range(0, 101), metavar="N")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        with (
            sigterm_raises(),
            tempfile.TemporaryDirectory(prefix="bench-sandbox-") as scratch,
            sandbox_server(Path(scratch)) as s,
        ):
            figures = measure(s, args.runs, args.burst)
    except ScaleboxError as exc:
        print(f"bench_sandbox: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(figures) if args.json else report(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
