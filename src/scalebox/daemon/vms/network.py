"""The VM network's rules on the host: isolation and outbound NAT, with nftables.

Every VM's host-side veth (``vm<hex>``, see nspawn.py) is put in the interface
group ``VM_LINK_GROUP`` when it is made, and the rules match that group, not a
name pattern: a name prefix such as ``vm*`` also matches interfaces that are
not ours (Proxmox's bridge is ``vmbr0``), and a guest cannot change the group
of an interface outside its namespace. What the rules do (``ruleset``):

- from a VM link, packets with a source that does not route back through that
  link (a guest spoofing another VM's address or the host's) and all IPv6 are
  dropped;
- the host accepts from a VM link only replies to its own connections (the
  SSH forwarders connect to the VM); every new connection a guest opens to any
  address of the host (the API port, other VMs' forwarder ports, sshd, DNS) is
  dropped;
- VM to VM is dropped; from elsewhere, only replies reach a VM;
- from VM_NETWORK to elsewhere (but link-local 169.254.0.0/16, where cloud
  metadata services hand out the host's credentials) is forwarded and
  masqueraded behind the host's address on the way out (outbound NAT).

They live in one table of our own, ``inet scalebox``, replaced whole in one
``nft -f`` transaction (packets see the old rules or the new, never none;
connections already tracked keep their NAT), and no other table is touched.
Our accepts do not open what another table drops: each table's chains see the
packet, and a drop in any of them is final. ``apply`` also turns on IPv4
forwarding. The rules stay in the kernel while scaleboxd is stopped or
updated; scaleboxd applies them again when it starts and before each VM
starts, so a new VM_NETWORK takes effect and a ruleset flushed by someone
else (``systemctl restart nftables``) comes back.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

from scalebox.daemon.vms.command import CommandFailed, run

TABLE_FAMILY = "inet"
TABLE_NAME = "scalebox"
TABLE = f"{TABLE_FAMILY} {TABLE_NAME}"
# The interface group of VMs' host-side veths (ip link ... group N); any number
# nobody else uses: 0 is every interface's default.
VM_LINK_GROUP = 0x5CB
# Where cloud providers serve instance metadata (and the host's credentials).
LINK_LOCAL = "169.254.0.0/16"
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")

log = logging.getLogger("scaleboxd")


def ruleset(vm_network: str) -> str:
    """The ``nft -f`` script that replaces table inet scalebox with the rules for ``vm_network``.

    The first line makes the table exist so that deleting it never fails; the
    whole script is one transaction.
    """
    network = str(ipaddress.IPv4Network(vm_network, strict=True))
    g = VM_LINK_GROUP
    return f"""\
table {TABLE}
delete table {TABLE}
table {TABLE} {{
	chain prerouting {{
		type filter hook prerouting priority raw; policy accept;
		iifgroup {g} meta nfproto ipv6 drop comment "VMs have no IPv6"
		iifgroup {g} fib saddr . iif oif missing drop comment "spoofed source"
	}}

	chain input {{
		type filter hook input priority filter; policy accept;
		iifgroup {g} ct state established,related accept comment "replies to the host's own connections (SSH forwarders)"
		iifgroup {g} drop comment "no new connection from a VM to the host"
	}}

	chain forward {{
		type filter hook forward priority filter; policy accept;
		iifgroup {g} oifgroup {g} drop comment "VM to VM"
		oifgroup {g} ct state established,related accept comment "replies to a VM"
		oifgroup {g} drop comment "no new connection from elsewhere to a VM"
		iifgroup {g} ip daddr {LINK_LOCAL} drop comment "link-local: cloud metadata"
		iifgroup {g} ip saddr {network} accept comment "VM to elsewhere"
		iifgroup {g} drop
	}}

	chain postrouting {{
		type nat hook postrouting priority srcnat; policy accept;
		ip saddr {network} oifgroup != {g} masquerade comment "outbound NAT"
	}}
}}
"""  # noqa: E501 - nft comments read best on one line


def apply(vm_network: str) -> None:
    """Load the rules for ``vm_network`` (replacing ours, atomically) and turn on IPv4 forwarding.

    Idempotent. Raises CommandFailed when nft is missing or refuses the rules:
    VMs are not started without their isolation. Forwarding that cannot be
    turned on (a read-only /proc/sys, as in a container) is logged, not
    raised: the VMs are isolated all the same, they only have no way out.
    """
    try:
        run(["nft", "-f", "-"], f"load the VM network rules (nft table {TABLE})",
            stdin=ruleset(vm_network))  # fmt: skip
    except CommandFailed as exc:
        if "not installed" in exc.what:
            raise CommandFailed(
                f"cannot isolate VMs: nft is not installed ({exc.what})",
                "install the Debian package nftables (apt-get install nftables), "
                "then systemctl restart scaleboxd",
            ) from None
        raise
    try:
        enable_forwarding()
    except CommandFailed as exc:
        log.warning("VMs have no outbound traffic: %s", exc)


def enable_forwarding(path: Path | None = None) -> bool:
    """Set net.ipv4.ip_forward (``path``, default IP_FORWARD) to 1; return whether it was off."""
    path = IP_FORWARD if path is None else path
    try:
        if path.read_text().strip() == "1":
            return False
        path.write_text("1\n")
    except OSError as exc:
        raise CommandFailed(
            f"cannot turn on IPv4 forwarding for the VMs' outbound traffic: {path}: {exc.strerror}",
            "scaleboxd must run as root; or set net.ipv4.ip_forward=1 in /etc/sysctl.d/",
        ) from None
    return True
