"""The guest program of one VM on the process backend.

On the nspawn backend ``run`` instead execs systemd-nspawn (nspawn.py).
The process guest stands in for a booted VM, for fast rootless API tests:
it listens on the VM's ssh_port and answers each connection with one JSON
line ``{"vm": "<id>", "file": "<DISK/hello.txt>"}``.

Run by ``scaleboxd --config PATH --run-guest VM_ID`` (the unit
scalebox-vm@.service) or, outside systemd, ``python -m
scalebox.daemon.vms.guest --data-dir D --vm-id ID``. Everything it uses is
imported here, at start: an update may replace the release directory while
the guest runs, and a late import would then load the wrong code or fail.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
from pathlib import Path
from types import FrameType

from scalebox.config import ServerConfig
from scalebox.daemon.vms.naming import VM_ID_RE
from scalebox.daemon.vms.nspawn import exec_guest

ANSWER_TIMEOUT = 5.0


def answer(vm_id: str, disk: Path) -> bytes:
    """The line a connection receives; a missing file answers an empty string."""
    try:
        content = (disk / "hello.txt").read_text(errors="replace")
    except OSError:
        content = ""
    return (json.dumps({"vm": vm_id, "file": content}) + "\n").encode()


def read_port(vm_dir: Path) -> int:
    """The ssh_port in ``vm_dir/vm.json``; ValueError or OSError when unusable."""
    record = json.loads((vm_dir / "vm.json").read_text())
    port = record.get("ssh_port") if isinstance(record, dict) else None
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"{vm_dir / 'vm.json'} has no valid ssh_port")
    return port


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def serve(data_dir: Path, vm_id: str) -> int:
    """Serve VM ``vm_id`` until SIGTERM; return the exit code."""
    if not VM_ID_RE.fullmatch(vm_id):
        print(f"scalebox guest: {vm_id!r} is not a VM id (vm-<12 hex>)", file=sys.stderr)
        return 2
    vm_dir = data_dir / "vms" / vm_id
    try:
        port = read_port(vm_dir)
    except (OSError, ValueError) as exc:
        print(f"scalebox guest {vm_id}: cannot read its port: {exc}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        server = socket.create_server(("0.0.0.0", port), backlog=64)
    except OSError as exc:
        print(f"scalebox guest {vm_id}: cannot listen on port {port}: {exc}", file=sys.stderr)
        return 1
    print(f"scalebox guest {vm_id}: listening on port {port}", flush=True)
    with server:
        while True:
            conn, _ = server.accept()
            with conn:
                conn.settimeout(ANSWER_TIMEOUT)
                try:
                    conn.sendall(answer(vm_id, vm_dir / "disk"))
                    conn.shutdown(socket.SHUT_WR)
                except OSError:
                    pass  # the client went away; the next one is served as usual


def run(config: ServerConfig, vm_id: str) -> int:
    """Entry for ``scaleboxd --config PATH --run-guest VM_ID`` (scalebox-vm@.service)."""
    if config.vm_backend == "nspawn":
        if not VM_ID_RE.fullmatch(vm_id):
            print(f"scalebox guest: {vm_id!r} is not a VM id (vm-<12 hex>)", file=sys.stderr)
            return 2
        return exec_guest(config, vm_id)  # execs systemd-nspawn; returns only on failure
    return serve(config.data_dir, vm_id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scalebox.daemon.vms.guest")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--vm-id", required=True)
    args = parser.parse_args(argv)
    return serve(args.data_dir, args.vm_id)


if __name__ == "__main__":
    sys.exit(main())
