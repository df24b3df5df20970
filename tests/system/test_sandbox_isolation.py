"""What a hostile guest (root in an nspawn VM) can reach, probed over real ssh.

Each assertion is a line of docs/guest-threat-model.md; when the behaviour
changes (user namespaces, the network rules), this test fails and
the doc must change with it. One server, two VMs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from tools.sandbox import Sandbox, sandbox_server

from .conftest import _skip_unless_able

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    _skip_unless_able()
    with sandbox_server(tmp_path_factory.mktemp("isolation")) as s:
        yield s


def _reach(s: Sandbox, port: int, address: str, to_port: int) -> bool:
    probe = f"timeout 5 bash -c 'exec 3<>/dev/tcp/{address}/{to_port}' && echo OPEN || echo SHUT"
    done = s.ssh(port, "/root/one", probe)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip() == "OPEN"


def test_what_a_guest_can_and_cannot_reach(sandbox: Sandbox) -> None:
    s = sandbox
    key = s.public_key()
    vms = []
    for _ in range(2):
        created = s.api("POST", "/vms", json={"template": "debian-base", "ssh_public_key": key})
        assert created.status_code in (200, 201), created.text
        vms.append(created.json())
    try:
        port = vms[0]["ssh_port"]
        addr = s.ssh(port, "/root/one", "ip -4 -o addr show eth0 | awk '{print $4}'")
        guest_ip = addr.stdout.strip().split("/")[0]
        other = s.ssh(vms[1]["ssh_port"], "/root/one", "ip -4 -o addr show eth0 | awk '{print $4}'")
        other_ip = other.stdout.strip().split("/")[0]
        a, b, c, d = (int(x) for x in guest_ip.split("."))
        gateway = f"{a}.{b}.{c}.{d - 1}"

        # A user namespace: UIDs 0..65535 of the guest are the VM's own 65536 of the
        # host (tests/system/test_sandbox_userns.py shows its processes from the host).
        record = json.loads(s.sh(f"cat /var/lib/scalebox/vms/{vms[0]['id']}/vm.json").stdout)
        uid_map = s.ssh(port, "/root/one", "cat /proc/self/uid_map").stdout.split()
        assert uid_map == ["0", str(record["uid_base"]), "65536"]
        assert record["uid_base"] >= 0x80000
        # Root in it has no power over its network namespace, which is the host's.
        changed = s.ssh(port, "/root/one", "sudo -n ip link set eth0 address 02:00:00:00:00:01")
        assert changed.returncode != 0 and "not permitted" in changed.stderr

        # The API port does not answer a guest, on its gateway nor on HOST_IP
        # (the nftables rules; tests/system/test_sandbox_network.py probes more).
        assert not _reach(s, port, gateway, 8080)
        assert not _reach(s, port, s.host_ip, 8080)

        # Another VM's address: dropped between VM links.
        assert not _reach(s, port, other_ip, 22)

        # Its own PID namespace: PID 1 is the guest's systemd, no host process shows.
        procs = s.ssh(port, "/root/one", "cat /proc/1/comm; ps -e -o comm=").stdout
        assert procs.splitlines()[0] == "systemd"
        assert "scaleboxd" not in procs and "systemd-socket-p" not in procs

        # No host path is mounted in: the host's config is not in the tree.
        seen = s.ssh(
            port, "/root/one", "sudo -n test -e /etc/scaleboxd/config && echo YES || echo NO"
        )
        assert seen.stdout.strip() == "NO"
    finally:
        for vm in vms:
            s.api("DELETE", f"/vms/{vm['id']}")
