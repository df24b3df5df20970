"""install.sh on a fresh Debian 12 server: refusals that must change nothing.

The rest of install.sh (layout, idempotency, bad tarballs) is proven by
tests/unit/test_release_install.py in a scratch root and by ./do check.
"""

from __future__ import annotations

from pathlib import Path

from tools.releases import A

from .conftest import BootMachine
from .update_helpers import MNT, tarball

# What a refused install must not have created.
INSTALL_PATHS = "/opt/scalebox /etc/scaleboxd /etc/scalebox /usr/local/bin/scaleboxd"


def test_a_server_without_python3_venv_is_refused_with_the_package_to_install(
    boot_machine: BootMachine, releases: Path
) -> None:
    """Offline server without ensurepip: install.sh names python3-venv and changes nothing."""
    m = boot_machine(releases)
    # The machine is a volatile overlay: hiding ensurepip here leaves the image intact.
    m.run(["sh", "-c", "mv /usr/lib/python3.11/ensurepip /root/ensurepip.hidden"])
    before = m.run(["sh", "-c", f"ls -d {INSTALL_PATHS} 2>/dev/null || true"]).stdout

    result = m.run(["bash", f"{MNT}/install.sh", tarball(A)], check=False, timeout=600)

    assert result.returncode != 0
    assert "python3" in result.stderr and "-venv" in result.stderr, result.stderr
    after = m.run(["sh", "-c", f"ls -d {INSTALL_PATHS} 2>/dev/null || true"]).stdout
    assert after == before == ""
    assert m.run(["systemctl", "is-active", "scaleboxd"], check=False).stdout.strip() != "active"
