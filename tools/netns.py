"""Network namespaces for test machines, and the guard on every request to them.

Machine N lives in namespace ``sbN``, joined to the host by the veth pair
``sbhN`` (host side, 10.251.N.1/30) and ``sbcN`` (machine side, 10.251.N.2/30).
A slot N is claimed by creating /run/scalebox-dev/sbN.json with O_EXCL, so two
runs at once never pick the same N; the file also marks the namespace as ours,
which is what lets the stale sweep remove it later and nothing else.

The guard matters because a request to 10.251.N.2 does not fail when the veth
is missing: it leaves through the host's default route to a network that is
not ours. So nothing is sent until the kernel's route to it names our veth.
That check asks the kernel over netlink (RTM_GETROUTE, what ``ip route get``
sends), in-process: a load of a few hundred requests a second checks before
each one, and an ``ip`` process each time spent the CPU the bench measures.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from scalebox.errors import ScaleboxError

STATE_DIR = Path(os.environ.get("SCALEBOX_DEV_STATE", "/run/scalebox-dev"))
PREFIX = "sb"
SLOTS = range(1, 251)


class NetnsError(ScaleboxError):
    """A machine's network could not be set up or is not ours."""


@dataclass(frozen=True)
class Slot:
    """The names and addresses of machine N's network."""

    n: int

    @property
    def name(self) -> str:
        return f"{PREFIX}{self.n}"

    @property
    def host_if(self) -> str:
        return f"{PREFIX}h{self.n}"

    @property
    def machine_if(self) -> str:
        return f"{PREFIX}c{self.n}"

    @property
    def host_ip(self) -> str:
        return f"10.251.{self.n}.1"

    @property
    def machine_ip(self) -> str:
        return f"10.251.{self.n}.2"

    @property
    def netns_path(self) -> Path:
        return Path("/run/netns") / self.name

    def state_file(self, state_dir: Path = STATE_DIR) -> Path:
        return state_dir / f"{self.name}.json"


def parse_name(name: str) -> Slot:
    """``sb7`` -> Slot(7); anything else is refused (we only touch our own names)."""
    digits = name.removeprefix(PREFIX)
    if not name.startswith(PREFIX) or not digits.isdigit() or int(digits) not in SLOTS:
        raise NetnsError(
            f"{name!r} is not a machine name of this harness",
            "names look like sb1 .. sb250; `./do machine list` shows the running ones",
        )
    return Slot(int(digits))


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise NetnsError(
            f"`ip {' '.join(args)}` failed: {result.stderr.strip()}",
            "run as root; `./do machine down --stale` removes leftovers of killed runs",
        )
    return result


def _in_use_by_others(slot: Slot) -> bool:
    """True when the host already has this slot's names or subnet (not made by us)."""
    if slot.netns_path.exists():
        return True
    links = json.loads(_ip("-j", "link", "show").stdout or "[]")
    names = {link.get("ifname") for link in links}
    if slot.host_if in names or slot.machine_if in names:
        return True
    addrs = json.loads(_ip("-j", "addr", "show").stdout or "[]")
    prefix = f"10.251.{slot.n}."
    return any(
        info.get("local", "").startswith(prefix)
        for link in addrs
        for info in link.get("addr_info", [])
    )


def claim_slot(owner: Mapping[str, object], state_dir: Path = STATE_DIR) -> Slot:
    """Claim a free slot atomically; its state file starts with ``owner``."""
    state_dir.mkdir(parents=True, exist_ok=True)
    for n in SLOTS:
        slot = Slot(n)
        try:
            fd = os.open(slot.state_file(state_dir), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"name": slot.name, **owner}, f)
        if _in_use_by_others(slot):
            # Something not ours holds these names or this subnet: leave it
            # alone, give the number back and try the next one.
            slot.state_file(state_dir).unlink()
            continue
        return slot
    raise NetnsError(
        f"no free machine slot in {state_dir} (all of sb1..sb250 are claimed)",
        "remove leftovers with `./do machine down --stale` or `./do machine down --all`",
    )


def release_slot(slot: Slot, state_dir: Path = STATE_DIR) -> None:
    with contextlib.suppress(FileNotFoundError):
        slot.state_file(state_dir).unlink()


def create_network(slot: Slot) -> None:
    """Make the namespace and the veth pair, addresses set and links up."""
    _ip("netns", "add", slot.name)
    _ip("link", "add", slot.host_if, "type", "veth", "peer", "name", slot.machine_if)
    _ip("link", "set", slot.machine_if, "netns", slot.name)
    _ip("addr", "add", f"{slot.host_ip}/30", "dev", slot.host_if)
    _ip("link", "set", slot.host_if, "up")
    _ip("-n", slot.name, "addr", "add", f"{slot.machine_ip}/30", "dev", slot.machine_if)
    _ip("-n", slot.name, "link", "set", slot.machine_if, "up")
    _ip("-n", slot.name, "link", "set", "lo", "up")


def delete_network(slot: Slot) -> None:
    """Remove the namespace and the veth; missing pieces are fine (idempotent)."""
    # Deleting one end of a veth deletes the other; the namespace goes with its last user.
    _ip("link", "del", slot.host_if, check=False)
    _ip("netns", "del", slot.name, check=False)


def network_exists(slot: Slot) -> bool:
    return (
        slot.netns_path.exists() or _ip("link", "show", slot.host_if, check=False).returncode == 0
    )


# rtnetlink (linux/rtnetlink.h, linux/netlink.h): the few numbers a route lookup needs.
_RTM_NEWROUTE, _RTM_GETROUTE, _NLMSG_ERROR = 24, 26, 2
_NLM_F_REQUEST = 1
_RTA_DST, _RTA_OIF = 1, 4
_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope,
#                                      type, flags
_RTATTR = struct.Struct("=HH")  # length, type


def route_device(address: str) -> str | None:
    """The device the host would send a packet to the IPv4 ``address`` through.

    None when the kernel has no route to it (or no such device any more).
    """
    dst = socket.inet_aton(address)
    attr = _RTATTR.pack(_RTATTR.size + len(dst), _RTA_DST) + dst
    body = _RTMSG.pack(socket.AF_INET, 32, 0, 0, 0, 0, 0, 0, 0) + attr
    header = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), _RTM_GETROUTE, _NLM_F_REQUEST, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(5)
        sock.sendto(header + body, (0, 0))
        reply = sock.recv(65536)
    length, kind, _, _, _ = _NLMSGHDR.unpack_from(reply)
    if kind != _RTM_NEWROUTE:  # _NLMSG_ERROR: e.g. ENETUNREACH
        return None
    offset = _NLMSGHDR.size + _RTMSG.size
    while offset + _RTATTR.size <= length:
        size, attr_type = _RTATTR.unpack_from(reply, offset)
        if size < _RTATTR.size:
            break
        if attr_type == _RTA_OIF:
            (index,) = struct.unpack_from("=I", reply, offset + _RTATTR.size)
            try:
                return socket.if_indextoname(index)
            except OSError:
                return None
        offset += (size + 3) & ~3  # attributes are 4-byte aligned
    return None


def guard(slot: Slot) -> None:
    """Refuse unless traffic to the machine's address stays on our own veth."""
    dev = route_device(slot.machine_ip)
    if dev != slot.host_if:
        raise NetnsError(
            f"refusing to send traffic to {slot.machine_ip}: the host routes it via "
            f"{dev or 'nothing'}, not via this machine's veth {slot.host_if}",
            "the machine's network is gone or was never made; tear it down "
            f"(`./do machine down {slot.name}`) and boot a new one",
        )
