"""The VM network's nftables rules (network.py): the text, and the real nft loading it.

The loading tests run nft in a network namespace of their own (``unshare
--net``), so the host's own ruleset is never touched; they need root and
nft (the Debian package nftables) and are skipped without them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from scalebox.daemon.vms import network
from scalebox.daemon.vms.command import CommandFailed

NFT = shutil.which("nft")
needs_nft = pytest.mark.skipif(
    NFT is None or os.geteuid() != 0, reason="needs root and nft (apt-get install nftables)"
)


def rule_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def test_the_rules_name_the_configured_network_and_only_our_table() -> None:
    text = network.ruleset("10.99.0.0/16")
    assert "ip saddr 10.99.0.0/16" in text
    assert "10.187." not in text
    tables = {line.split("{")[0].strip() for line in rule_lines(text) if "table " in line}
    assert tables == {"table inet scalebox", "delete table inet scalebox"}
    # No flush of the whole ruleset, no other table.
    assert "flush" not in text


def test_the_rules_replace_the_table_in_one_script() -> None:
    """Create-if-absent, delete, define: one nft -f transaction, so never a moment without."""
    lines = rule_lines(network.ruleset("10.187.0.0/16"))
    assert lines[:3] == [
        "table inet scalebox",
        "delete table inet scalebox",
        "table inet scalebox {",
    ]


def test_every_vm_rule_matches_the_vm_link_group_not_a_name() -> None:
    text = network.ruleset("10.187.0.0/16")
    assert "iifname" not in text and "oifname" not in text
    assert f"iifgroup {network.VM_LINK_GROUP} drop" in text  # input and forward both end so


def test_a_network_that_is_not_one_is_refused() -> None:
    with pytest.raises(ValueError, match="host bits"):
        network.ruleset("10.187.0.1/16")


def test_forwarding_is_turned_on_once(tmp_path: Path) -> None:
    sysctl = tmp_path / "ip_forward"
    sysctl.write_text("0\n")
    assert network.enable_forwarding(sysctl) is True
    assert sysctl.read_text().strip() == "1"
    assert network.enable_forwarding(sysctl) is False


def test_forwarding_that_cannot_be_turned_on_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CommandFailed, match="cannot turn on IPv4 forwarding") as caught:
        network.enable_forwarding(tmp_path / "missing" / "ip_forward")
    assert caught.value.hint is not None and "root" in caught.value.hint


def _in_own_netns(script: str) -> str:
    done = subprocess.run(
        ["unshare", "--net", "sh", "-euc", script],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@needs_nft
def test_nft_loads_the_rules_again_and_again_and_leaves_other_tables_alone(
    tmp_path: Path,
) -> None:
    first, second = tmp_path / "first.nft", tmp_path / "second.nft"
    first.write_text(network.ruleset("10.187.0.0/16"))
    second.write_text(network.ruleset("10.42.0.0/24"))
    listing = _in_own_netns(
        "nft add table inet other; nft add chain inet other c; "
        "nft add rule inet other c counter accept; "
        f"nft -f {first}; nft -f {first}; nft -f {second}; nft list ruleset"
    )
    assert listing.count("table inet scalebox") == 1
    # The second network replaced the first.
    assert "ip saddr 10.42.0.0/24" in listing
    assert "10.187.0.0/16" not in listing
    assert "masquerade" in listing
    # Someone else's table is still there, with its rule.
    assert "table inet other" in listing
    assert "counter packets 0 bytes 0 accept" in listing


@needs_nft
def test_a_broken_script_changes_nothing(tmp_path: Path) -> None:
    """nft -f is all or nothing: a failing load leaves the rules that were there."""
    good, bad = tmp_path / "good.nft", tmp_path / "bad.nft"
    good.write_text(network.ruleset("10.187.0.0/16"))
    bad.write_text(network.ruleset("10.42.0.0/24").replace("masquerade", "masqueradex"))
    listing = _in_own_netns(f"nft -f {good}; nft -f {bad} 2>/dev/null || true; nft list ruleset")
    assert "ip saddr 10.187.0.0/16" in listing
    assert "10.42.0.0/24" not in listing


def test_without_nft_the_error_says_which_package_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty PATH: no nft on it
    sysctl_before = network.IP_FORWARD.read_text()
    with pytest.raises(CommandFailed, match="nft is not installed") as caught:
        network.apply("10.187.0.0/16")
    assert caught.value.hint is not None and "apt-get install nftables" in caught.value.hint
    assert network.IP_FORWARD.read_text() == sysctl_before  # nothing changed


def test_forwarding_that_cannot_be_turned_on_is_logged_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Isolation is what apply must not do without; outbound NAT is not (a read-only /proc/sys)."""
    fake_nft = tmp_path / "nft"
    # A stand-in that accepts any script: the real nft would load into this host's ruleset.
    fake_nft.write_text("#!/bin/sh\ncat >/dev/null\n")
    fake_nft.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    monkeypatch.setattr(network, "IP_FORWARD", tmp_path / "missing" / "ip_forward")
    network.apply("10.187.0.0/16")
    assert "VMs have no outbound traffic: cannot turn on IPv4 forwarding" in caplog.text
