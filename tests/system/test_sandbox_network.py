"""The VM network's rules on a real server: what a guest can open, and outbound NAT.

From inside a VM (root over real ssh) the host's API port and the other VM's
SSH forwarder port, on HOST_IP and on the VM's gateway, and the other VM's own
address do not connect; a connection "out" (to a namespace of the harness's
own inside the test machine, TEST-NET-1, see Sandbox.outside) arrives from
the server's address, not the VM's. The rules stay while scaleboxd is down.
Nothing is sent anywhere but our own machine. One server, two VMs.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from tools.sandbox import (
    OUTSIDE_GATEWAY,
    OUTSIDE_PORT,
    OUTSIDE_UDP_LOG,
    Sandbox,
    sandbox_server,
)

from .conftest import _skip_unless_able

pytestmark = pytest.mark.system

KEY = "/root/one"
API_PORT = 8080
# Sends one UDP datagram with any source address (needs CAP_NET_RAW in the
# VM's network namespace): argv = source, destination, port, payload. The kernel fills in the
# IP checksum and id; a UDP checksum of 0 means none.
RAW_UDP = """
import socket, struct, sys
src, dst, port, payload = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].encode()
udp = struct.pack("!HHHH", 40000, port, 8 + len(payload), 0) + payload
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                 socket.inet_aton(src), socket.inet_aton(dst))
socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW).sendto(ip + udp, (dst, 0))
"""


@dataclass(frozen=True)
class Net:
    s: Sandbox
    vm_id: str  # VM one's
    port: int  # VM one's ssh port
    other_port: int  # VM two's
    guest_ip: str
    gateway: str
    other_ip: str
    outside: str


def _guest_ip(s: Sandbox, port: int) -> str:
    done = s.ssh(port, KEY, "ip -4 -o addr show eth0 | awk '{print $4}'")
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split("/")[0]


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    _skip_unless_able()
    with sandbox_server(tmp_path_factory.mktemp("network")) as s:
        body = {"template": "debian-base", "ssh_public_key": s.public_key()}
        vms = []
        try:
            for _ in range(2):
                made = s.api("POST", "/vms", json=body)
                assert made.status_code in (200, 201), made.text
                vms.append(made.json())
            port, other_port = vms[0]["ssh_port"], vms[1]["ssh_port"]
            guest_ip = _guest_ip(s, port)
            a, b, c, d = (int(x) for x in guest_ip.split("."))
            with s.outside() as outside:
                yield Net(s, vms[0]["id"], port, other_port, guest_ip, f"{a}.{b}.{c}.{d - 1}",
                          _guest_ip(s, other_port), outside)  # fmt: skip
        finally:
            for vm in vms:
                s.api("DELETE", f"/vms/{vm['id']}")


def _opens(net: Net, address: str, to_port: int) -> bool:
    """Whether root in VM one can open a TCP connection to address:to_port."""
    probe = f"timeout 3 bash -c 'exec 3<>/dev/tcp/{address}/{to_port}' && echo OPEN || echo SHUT"
    done = net.s.ssh(net.port, KEY, probe)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() in ("OPEN", "SHUT"), done.stdout
    return done.stdout.strip() == "OPEN"


def _seen_as(net: Net, port: int | None = None) -> str:
    """The source address the outside listener saw a VM's connection come from (VM one's)."""
    fetch = f"exec 3<>/dev/tcp/{net.outside}/{OUTSIDE_PORT}; head -n1 <&3"
    done = net.s.ssh(port or net.port, KEY, f"timeout 5 bash -c {shlex.quote(fetch)}")
    assert done.returncode == 0, f"no connection out: {done.stdout}{done.stderr}"
    return done.stdout.strip()


def test_the_probe_can_connect(net: Net) -> None:
    """The probe itself works: the guest reaches its own sshd (so SHUT below means blocked)."""
    assert _opens(net, "127.0.0.1", 22)


def test_a_guest_cannot_open_the_api_port_of_the_host(net: Net) -> None:
    assert not _opens(net, net.gateway, API_PORT)
    assert not _opens(net, net.s.host_ip, API_PORT)
    # ... while the API answers on that address from the host itself.
    assert net.s.sh(f"curl -fsS http://{net.s.host_ip}:{API_PORT}/health").returncode == 0


def test_a_guest_cannot_open_another_vms_ssh_forwarder(net: Net) -> None:
    assert not _opens(net, net.s.host_ip, net.other_port)
    assert not _opens(net, net.gateway, net.other_port)
    # Nor its own, through the host: a guest opens nothing on the host.
    assert not _opens(net, net.s.host_ip, net.port)


def test_a_guest_cannot_reach_another_vm_though_the_host_forwards(net: Net) -> None:
    forwarding = net.s.sh("cat /proc/sys/net/ipv4/ip_forward").stdout.strip()
    assert forwarding == "1"  # so only the rules keep the VMs apart
    assert not _opens(net, net.other_ip, 22)


def test_outbound_traffic_is_masqueraded_behind_the_servers_address(net: Net) -> None:
    seen = _seen_as(net)
    assert seen == OUTSIDE_GATEWAY, f"the outside saw {seen!r}, not the server's address"
    assert seen != net.guest_ip


def test_a_guest_cannot_send_with_another_vms_address(net: Net) -> None:
    """Root in a guest cannot forge packets, and forged packets from its link are dropped.

    Root in the guest is an unprivileged UID of its own user namespace, which
    does not own the VM's network namespace (tests/system/test_sandbox_userns.py):
    it may not open a raw socket nor change its address. The rules do not rely
    on that (a VM without a user namespace has root's CAP_NET_RAW there): raw
    packets sent into the VM's link from its network namespace by the host's
    root, with a spoofed source, are dropped; the same with its own source arrive.
    """
    args = shlex.join([net.guest_ip, net.outside, str(OUTSIDE_PORT), "from-guest"])
    refused = net.s.ssh(net.port, KEY, f"sudo -n python3 -c {shlex.quote(RAW_UDP)} {args}")
    assert refused.returncode != 0 and "Operation not permitted" in refused.stderr, refused
    for source, payload in ((net.guest_ip, "own"), (net.other_ip, "spoofed-vm"),
                            (net.s.host_ip, "spoofed-host")):  # fmt: skip
        args = shlex.join([source, net.outside, str(OUTSIDE_PORT), payload])
        sent = net.s.sh(f"nsenter --net=/run/netns/scalebox-{net.vm_id} "
                        f"python3 -c {shlex.quote(RAW_UDP)} {args}", check=False)  # fmt: skip
        assert sent.returncode == 0, sent.stderr
    seen = net.s.sh(f"sleep 1; cat {OUTSIDE_UDP_LOG} 2>/dev/null || true").stdout
    assert f"{OUTSIDE_GATEWAY} own" in seen.splitlines()  # the probe works (and is NATed)
    assert "spoofed" not in seen and "from-guest" not in seen, seen


def test_the_hosts_own_ssh_to_a_vm_still_works(net: Net) -> None:
    done = net.s.ssh(net.other_port, KEY, "sudo -n true && echo ok")
    assert done.stdout.strip() == "ok", done.stderr


def test_the_rules_stay_while_scaleboxd_is_stopped(net: Net) -> None:
    s = net.s
    s.sh("systemctl stop scaleboxd.service scaleboxd.socket")
    try:
        listing = s.sh("nft list table inet scalebox").stdout
        assert "masquerade" in listing
        assert not _opens(net, s.host_ip, net.other_port)
        assert _seen_as(net) == OUTSIDE_GATEWAY
    finally:
        s.sh("systemctl start scaleboxd.socket scaleboxd.service", check=False)
        # A start right after a stop failed with 219/CGROUP now and then in CI (two
        # machines shared one cgroup tree; tools/cgroups.py); were it to, the unit's
        # Restart=on-failure starts it again 2 s later, as on a server. What must
        # hold: it is running.
        up = s.sh("for i in $(seq 50); do systemctl is-active -q scaleboxd && exit 0; "
                  "sleep 0.2; done; exit 1", check=False)  # fmt: skip
        log = s.sh("journalctl -u scaleboxd -u scaleboxd.socket -n 40 --no-pager", check=False)
        assert up.returncode == 0, log.stdout
    # Started again: the table is replaced, not doubled, and still works.
    assert s.sh("nft list tables").stdout.count("table inet scalebox") == 1
    assert _seen_as(net) == OUTSIDE_GATEWAY
    assert not _opens(net, s.host_ip, API_PORT)


def test_a_new_vm_network_applies_when_scaleboxd_restarts(net: Net) -> None:
    """Last in the module: VMs one and two keep addresses of the old network."""
    s = net.s
    s.sh("echo VM_NETWORK=10.188.0.0/16 >> /etc/scaleboxd/config && systemctl restart scaleboxd")
    listing = s.sh("nft list table inet scalebox").stdout
    assert "ip saddr 10.188.0.0/16" in listing
    assert "10.187.0.0/16" not in listing
    made = s.api("POST", "/vms", json={"template": "debian-base", "ssh_public_key": s.public_key()})
    assert made.status_code in (200, 201), made.text
    vm = made.json()
    try:
        assert _guest_ip(s, vm["ssh_port"]).startswith("10.188.")
        assert _seen_as(net, vm["ssh_port"]) == OUTSIDE_GATEWAY
    finally:
        s.api("DELETE", f"/vms/{vm['id']}")
