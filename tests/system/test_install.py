"""install.sh (and bootstrap.sh) on fresh Debian 12 servers, under attack and in odd setups.

The releases are real, built and signed by this checkout (``install_releases``):
A and B signed by the publisher's key, and hostile tarballs crafted from A:
signed by another key with a verifier that accepts anything, an altered
verifier wheel under the publisher's unchanged signature, hostile names in a
validly signed manifest, an extra unit file the manifest does not list.
Every refusal ends with the nothing-changed check (``Server state``), the
exit code and the message. The rest of install.sh (layout, idempotency) is
proven by tests/unit/test_release_install.py in a scratch root and by ./do check.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import shutil
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from tools import keygen
from tools.machine import Machine
from tools.releases import ARCH, ROOT, A, B, build_tarball, tarball_name

from .update_helpers import MNT, Tree, tarball

BootMachine = Callable[..., Machine]

# What a refused install must not have created or changed.
INSTALL_PATHS = "/opt/scalebox /etc/scaleboxd /etc/scalebox /usr/local/bin /etc/systemd/system"
EVIL_VERIFIER = f"evil-verifier-{tarball_name(A)}"  # another key, a verifier that accepts all
TAMPERED_WHEEL = f"tampered-wheel-{tarball_name(A)}"  # that verifier, publisher's signature
DOTDOT_PROGRAM = f"dotdot-program-{tarball_name(A)}"
FOREIGN_UNIT = f"foreign-unit-{tarball_name(A)}"
CASE_TWINS = f"case-twins-{tarball_name(A)}"
EXTRA_UNIT = f"extra-unit-{tarball_name(A)}"
HUGE_HEADER = f"huge-header-{tarball_name(A)}"  # 1 MiB of gzip, a 1 GiB pax header
EVIL_RAN = "/tmp/scalebox-evil-ran"  # the hostile code's mark, if it ever runs


def _patch_wheel(wheel: bytes, member: str, old: str, new: str) -> bytes:
    """The wheel with one text change in ``member`` and its RECORD line made to match."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(wheel)) as src, zipfile.ZipFile(out, "w") as dst:
        changed = src.read(member).decode()
        assert old in changed, f"{member} no longer contains {old!r}: update this test"
        data = changed.replace(old, new, 1).encode()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        for info in src.infolist():
            body = src.read(info.filename)
            if info.filename == member:
                body = data
            elif info.filename.endswith(".dist-info/RECORD"):
                lines = [
                    f"{member},sha256={digest},{len(data)}"
                    if line.startswith(member + ",")
                    else line
                    for line in body.decode().splitlines()
                ]
                body = ("\n".join(lines) + "\n").encode()
            dst.writestr(info, body)
    return out.getvalue()


def _put(tree: Tree, manifest: dict[str, object], relpath: str, data: bytes) -> None:
    """Replace a file and its sha256 in the manifest (signing is the caller's)."""
    tree.put(relpath, data)
    files = manifest["files"]
    assert isinstance(files, dict)
    files[relpath] = hashlib.sha256(data).hexdigest()


def _evil_verifier(tree: Tree) -> bytes:
    """A's scalebox wheel whose verifier takes any signature, and marks that it ran."""
    wheel = f"wheels/scalebox-{A}-py3-none-any.whl"
    return _patch_wheel(
        tree.get(wheel),
        "scalebox/release/extract.py",
        "            signer = signing.find_signer(manifest_bytes, signature, keys, self.retired)\n",
        f"            open({EVIL_RAN!r}, 'w').close()\n            signer = keys[0]\n",
    )


def _craft(out: Path, key: Path, other_key: Path, other_pub: Path) -> None:
    good = out / tarball_name(A)
    wheel = f"wheels/scalebox-{A}-py3-none-any.whl"

    # Signed by another key that the tarball ships, with a verifier that accepts any
    # signature and an install.sh that marks that it ran: self-consistent, as an attacker
    # who cannot sign with the publisher's key would make it.
    tree = Tree.read(good)
    manifest = tree.manifest()
    _put(tree, manifest, wheel, _evil_verifier(tree))
    _put(tree, manifest, "keys/release.pub", other_pub.read_bytes())
    script = tree.get("scripts/install.sh").decode()
    _put(
        tree,
        manifest,
        "scripts/install.sh",
        script.replace("set -euo pipefail\n", f"set -euo pipefail\ntouch {EVIL_RAN}\n", 1).encode(),
    )
    tree.sign(manifest, other_key)
    tree.write(out / EVIL_VERIFIER)

    # The same verifier under the publisher's untouched signature: its hash is wrong.
    tree = Tree.read(good)
    tree.put(wheel, _evil_verifier(tree))
    tree.write(out / TAMPERED_WHEEL)

    # Validly signed by the publisher's key, hostile in its names.
    for name, field, value in (
        (
            DOTDOT_PROGRAM,
            "entry_points",
            ["scalebox", "scalebox-update", "scaleboxd", "../../etc/evil"],
        ),
        (CASE_TWINS, "entry_points", ["scalebox", "scalebox-update", "scaleboxd", "scaleboxD"]),
    ):
        tree = Tree.read(good)
        manifest = tree.manifest()
        manifest[field] = value
        tree.sign(manifest, key)
        tree.write(out / name)

    # A unit that is not ours, listed (with its file) as a unit of the release.
    tree = Tree.read(good)
    manifest = tree.manifest()
    unit = b"[Service]\nExecStart=/bin/touch " + EVIL_RAN.encode() + b"\n"
    _add(tree, manifest, "units/ssh.service", unit)
    units = manifest["units"]
    assert isinstance(units, list)
    units.append("ssh.service")
    tree.sign(manifest, key)
    tree.write(out / FOREIGN_UNIT)

    # A unit file in units/ (and in files) that the manifest's units do not list.
    tree = Tree.read(good)
    manifest = tree.manifest()
    _add(tree, manifest, "units/scalebox-evil.service", unit)
    tree.sign(manifest, key)
    tree.write(out / EXTRA_UNIT)


def _add(tree: Tree, manifest: dict[str, object], relpath: str, data: bytes) -> None:
    """A new regular file in the tarball, listed with its sha256 in ``files``."""
    first = tree.members[0][0]
    info = type(first)(f"{tree.top}/{relpath}")
    info.mode, info.mtime, info.size = 0o644, first.mtime, len(data)
    tree.members.append((info, data))
    files = manifest["files"]
    assert isinstance(files, dict)
    files[relpath] = hashlib.sha256(data).hexdigest()


def _huge_header(path: Path) -> None:
    """A tarball whose first member is a 1 GiB pax header: it attacks memory before any
    signature is looked at (about 1 MiB of gzip)."""
    size = 1 << 30
    info = tarfile.TarInfo(f"scalebox-{A}-{ARCH}/PaxHeader")
    info.type, info.size, info.mode = tarfile.XHDTYPE, size, 0o644
    chunk = b"0" * (1 << 20)
    with gzip.open(path, "wb", compresslevel=6) as out:
        out.write(info.tobuf(format=tarfile.USTAR_FORMAT))
        for _ in range(size // len(chunk)):
            out.write(chunk)


@pytest.fixture(scope="module")
def install_releases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """/mnt/release for this module: A, B, the scripts, both keys' .pub, the hostile tarballs."""
    out = tmp_path_factory.mktemp("install-releases")
    key, pub = keygen.keygen(tmp_path_factory.mktemp("publisher"))
    other_key, other_pub = keygen.keygen(tmp_path_factory.mktemp("attacker"))
    build_tarball(out, key, A)
    build_tarball(out, key, B)
    shutil.copy2(ROOT / "scripts" / "install.sh", out / "install.sh")
    shutil.copy2(ROOT / "scripts" / "bootstrap.sh", out / "bootstrap.sh")
    shutil.copy2(pub, out / "publisher.pub")
    shutil.copy2(other_pub, out / "attacker.pub")
    _craft(out, key, other_key, other_pub)
    _huge_header(out / HUGE_HEADER)
    return out


def state(m: Machine) -> str:
    """Every path install.sh may touch, with type, mode and content hash; and scaleboxd."""
    return m.run(
        [
            "bash",
            "-c",
            f"for p in {INSTALL_PATHS}; do [ -e $p ] && find $p -printf '%p %y %m %l\\n'; done "
            f"| sort; find {INSTALL_PATHS} -type f -print0 2>/dev/null | sort -z "
            "| xargs -0 -r sha256sum; systemctl is-active scaleboxd || true; "
            # install.sh's scratch directory goes too, whatever the outcome.
            f"ls -d {EVIL_RAN} /etc/evil /usr/local/etc/evil /tmp/scalebox-install.* "
            "2>/dev/null || true",
        ]
    ).stdout


def install(m: Machine, *args: str, umask: str = "022") -> tuple[int, str, str]:
    """install.sh with ARGS, on the process backend (these tests are about the release)."""
    script = f'umask {umask}; exec bash {MNT}/install.sh --backend process "$@"'
    done = m.run(["bash", "-c", script, "install", *args], check=False, timeout=600)
    return done.returncode, done.stdout, done.stderr


def assert_refused(m: Machine, before: str, code: int, err: str, *reason: str) -> None:
    """Exit 1, a message with what and what to do, and nothing changed."""
    assert code == 1, err
    assert "install.sh: error:" in err and "hint:" in err, err
    assert "nothing was changed" in err, err
    for text in reason:
        assert text in err, err
    assert "Traceback" not in err, err
    assert state(m) == before


# --- point 1: a pinned key is checked by code that does not come from the tarball ----


def test_a_pinned_key_refuses_a_tarball_with_its_own_accept_all_verifier(
    boot_machine: BootMachine, install_releases: Path
) -> None:
    """Key pinned by hand in /etc/scalebox/keys: another key's tarball, whose verifier
    accepts anything, and that verifier under the publisher's signature are refused."""
    m = boot_machine(install_releases)
    m.run(["install", "-D", "-m", "0644", f"{MNT}/publisher.pub", "/etc/scalebox/keys/release.pub"])
    # The attack is real: the tarball's own verifier passes it against the pinned key.
    own = m.run(
        [
            "bash",
            "-c",
            f"mkdir /root/site && cd /root/site && python3 -c 'import tarfile,zipfile,io,sys; "
            f"t=tarfile.open(sys.argv[1]); [zipfile.ZipFile(io.BytesIO(t.extractfile(x).read()))"
            f'.extractall(".") for x in t if x.name.endswith("py3-none-any.whl") '
            f'or "cp311" in x.name or "abi3" in x.name]\' {MNT}/{EVIL_VERIFIER} && '
            f"PYTHONPATH=/root/site python3 -m scalebox.release.verify {MNT}/{EVIL_VERIFIER} "
            f"/root/out --trusted-keys /etc/scalebox/keys; rc=$?; rm -rf /root/site /root/out "
            f"{EVIL_RAN}; exit $rc",
        ],
        check=False,
    )
    assert own.returncode == 0 and own.stdout.strip() == A, own.stderr
    before = state(m)

    code, _out, err = install(m, f"{MNT}/{EVIL_VERIFIER}")
    assert_refused(m, before, code, err, "not signed by a trusted key", "/etc/scalebox/keys/")
    assert "--key" in err  # what to do if the publisher really changed keys

    code, _out, err = install(m, f"{MNT}/{TAMPERED_WHEEL}")
    assert_refused(m, before, code, err, "does not match the signed RELEASE.json")

    # The publisher's real release still installs, checked the same way.
    code, out, err = install(m, tarball(A))
    assert code == 0, err
    assert "RELEASE.json is signed by /etc/scalebox/keys/release.pub" in out
    assert httpx.get(m.url(8080, "/health"), timeout=10).json()["version"] == A


def test_install_key_pins_the_key_and_refuses_others(
    boot_machine: BootMachine, install_releases: Path
) -> None:
    """--key: another key's tarball, and the real one against the wrong key, change
    nothing; the real one with its key installs and that key is the one trusted."""
    m = boot_machine(install_releases)
    before = state(m)

    code, _out, err = install(m, "--key", f"{MNT}/publisher.pub", f"{MNT}/{EVIL_VERIFIER}")
    assert_refused(m, before, code, err, "not signed by a trusted key", f"{MNT}/publisher.pub")
    code, _out, err = install(m, "--key", f"{MNT}/attacker.pub", tarball(A))
    assert_refused(m, before, code, err, "not signed by a trusted key", f"{MNT}/attacker.pub")
    code, _out, err = install(m, "--key", f"{MNT}/{tarball_name(A)}", tarball(A))
    assert code == 1 and "is not an ed25519 public key" in err and "hint:" in err, err
    assert state(m) == before

    code, out, err = install(m, "--key", f"{MNT}/publisher.pub", tarball(A))
    assert code == 0, err
    assert "signed by the pinned key" in out
    pinned = m.run(["cat", "/etc/scalebox/keys/release.pub"]).stdout
    assert pinned == (install_releases / "publisher.pub").read_text()
    assert m.run(["ls", "/etc/scalebox/keys"]).stdout.split() == ["release.pub"]
    assert httpx.get(m.url(8080, "/health"), timeout=10).json()["version"] == A


def test_a_pinned_key_without_openssl_is_refused_naming_the_package(
    boot_machine: BootMachine, install_releases: Path
) -> None:
    """Without openssl nothing outside the tarball can check its signature: refused."""
    m = boot_machine(install_releases)
    # The machine is a volatile overlay: hiding openssl here leaves the image intact.
    m.run(["mv", "/usr/bin/openssl", "/root/openssl.hidden"])
    m.run(["install", "-D", "-m", "0644", f"{MNT}/publisher.pub", "/etc/scalebox/keys/release.pub"])
    before = state(m)
    code, _out, err = install(m, tarball(A))
    assert_refused(m, before, code, err, "openssl is not installed", "apt-get install openssl")
    assert "nothing was changed" in err


def test_bootstrap_with_a_pinned_key_never_runs_the_tarballs_installer(
    boot_machine: BootMachine, install_releases: Path
) -> None:
    """bootstrap.sh runs the install.sh inside the tarball: with SCALEBOX_KEY it checks
    first that the publisher's key signed it, and refuses another key's tarball."""
    m = boot_machine(install_releases)
    before = state(m)
    done = m.run(
        [
            "bash",
            "-c",
            f"SCALEBOX_KEY={MNT}/publisher.pub SCALEBOX_RELEASE_URL={MNT}/{EVIL_VERIFIER} "
            f"bash {MNT}/bootstrap.sh",
        ],
        check=False,
        timeout=600,
    )
    assert done.returncode == 1, done.stderr
    assert "bootstrap.sh: error:" in done.stderr and "hint:" in done.stderr
    assert "not signed by" in done.stderr and "nothing was changed" in done.stderr
    assert state(m) == before  # includes: EVIL_RAN was never created

    done = m.run(
        [
            "bash",
            "-c",
            f"SCALEBOX_RELEASE_URL={tarball(A)} bash {MNT}/bootstrap.sh --key {MNT}/publisher.pub "
            "--backend process",
        ],
        check=False,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert (
        m.run(["cat", "/etc/scalebox/keys/release.pub"]).stdout
        == (install_releases / "publisher.pub").read_text()
    )


def test_a_huge_tar_header_is_refused_within_a_memory_bound(
    boot_machine: BootMachine, install_releases: Path
) -> None:
    """install.sh's own reader (pinned key: before openssl; no key: before the wheels)
    stops at its 768 MiB cap with a message, not by exhausting the server."""
    m = boot_machine(install_releases)
    before = state(m)
    code, _out, err = install(m, f"{MNT}/{HUGE_HEADER}")
    assert_refused(m, before, code, err, "needs more than 768 MiB to read")
    m.run(["install", "-D", "-m", "0644", f"{MNT}/publisher.pub", "/etc/scalebox/keys/release.pub"])
    before = state(m)
    code, _out, err = install(m, f"{MNT}/{HUGE_HEADER}")
    assert_refused(m, before, code, err, "needs more than 768 MiB to read")


# --- point 6: names and what is installed --------------------------------------------


def test_hostile_names_in_a_validly_signed_manifest_are_refused(
    boot_machine: BootMachine, install_releases: Path
) -> None:
    """A program '../../etc/evil', a unit that is not ours (ssh.service), names equal
    ignoring case: each refused before anything is written."""
    m = boot_machine(install_releases)
    before = state(m)
    # The shipped verifier (scalebox.release.manifest) refuses the path and the
    # case twins before install.sh's own check; either layer's words will do.
    for name, reasons in (
        (DOTDOT_PROGRAM, ("'../../etc/evil'", "not a plain")),
        (FOREIGN_UNIT, ("the unit 'ssh.service', which is not a plain scalebox unit",)),
        (CASE_TWINS, ("'scaleboxd' and 'scaleboxD'", "case")),
    ):
        code, _out, err = install(m, f"{MNT}/{name}")
        assert_refused(m, before, code, err, *reasons)


def test_a_unit_file_the_manifest_does_not_list_is_not_installed(
    boot_machine: BootMachine, install_releases: Path
) -> None:
    m = boot_machine(install_releases)
    code, _out, err = install(m, f"{MNT}/{EXTRA_UNIT}")
    assert code == 0, err
    found = m.run(
        ["bash", "-c", "find / -xdev -name 'scalebox-evil.service' -not -path '/mnt/*'"]
    ).stdout
    assert found == ""
    listed = json.loads(m.run(["cat", f"/opt/scalebox/releases/{A}/RELEASE.json"]).stdout)
    installed = m.run(["ls", f"/opt/scalebox/releases/{A}/units"]).stdout.split()
    assert installed == sorted(listed["units"])


# --- point 7: the caller's umask ------------------------------------------------------


def test_umask_000_leaves_nothing_writable_by_others(
    boot_machine: BootMachine, install_releases: Path
) -> None:
    m = boot_machine(install_releases)
    m.run(
        [
            "bash",
            "-c",
            "printf 'API_TOKEN=sb-%048d\\nHOST_IP=127.0.0.1\\nAPI_PORT=8282\\n"
            "VM_BACKEND=process\\n' 0 > /root/config",
        ]
    )
    m.run(["install", "-D", "-m", "0600", "/root/config", "/etc/scaleboxd/config"])
    code, _out, err = install(m, tarball(A), umask="000")
    assert code == 0, err
    writable = m.run(
        [
            "bash",
            "-c",
            "find -L /opt/scalebox /etc/scaleboxd /etc/scalebox /usr/local/bin/scalebox* "
            "/etc/systemd/system/scalebox* -perm -o+w",
        ]
    ).stdout
    assert writable == ""
    # The check can fail: a file made under umask 000 is found.
    m.run(["bash", "-c", "umask 000 && touch /opt/scalebox/probe"])
    probe = m.run(["find", "-L", "/opt/scalebox", "-perm", "-o+w"]).stdout
    assert probe.strip() == "/opt/scalebox/probe"


# --- issue 9: API_PORT other than 8080 -------------------------------------------------


def test_api_port_8181_is_served_by_install_and_kept_by_an_update(
    boot_machine: BootMachine, install_releases: Path
) -> None:
    m = boot_machine(install_releases)
    token = "sb-" + "ab" * 24
    m.run(
        [
            "bash",
            "-c",
            f"install -d -m 0755 /etc/scaleboxd && printf 'API_TOKEN={token}\\n"
            "HOST_IP=127.0.0.1\\nAPI_PORT=8181\\nVM_BACKEND=process\\n' > /etc/scaleboxd/config && "
            "chmod 0600 /etc/scaleboxd/config",
        ]
    )
    code, out, err = install(m, tarball(A))
    assert code == 0, err
    assert "API:   http://127.0.0.1:8181" in out
    assert "http://127.0.0.1:8181/health" in out
    assert httpx.get(m.url(8181, "/health"), timeout=10).json()["version"] == A
    with pytest.raises(httpx.TransportError):
        httpx.get(m.url(8080, "/health"), timeout=5)

    # As on a server whose drop-in is gone (or was hand-made under another name): the
    # update writes it again from the config, and B serves on 8181 also after a restart.
    m.run(
        [
            "bash",
            "-c",
            "rm /etc/systemd/system/scaleboxd.socket.d/port.conf && systemctl daemon-reload",
        ]
    )
    done = m.run(
        ["bash", "-c", f"SCALEBOX_RELEASE_URL={tarball(B)} scalebox-update"],
        check=False,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert (
        "ListenStream=8181"
        in m.run(["cat", "/etc/systemd/system/scaleboxd.socket.d/port.conf"]).stdout
    )
    m.run(["systemctl", "restart", "scaleboxd.socket", "scaleboxd.service"])
    assert httpx.get(m.url(8181, "/health"), timeout=10).json()["version"] == B


# --- the nspawn backend on a server that reaches no mirror -------------------------------


def test_nspawn_without_a_template_or_a_mirror_stops_before_the_switch_naming_template(
    boot_machine: BootMachine, install_releases: Path
) -> None:
    """The default backend needs debootstrap and a mirror to build debian-base; the test
    machine reaches no mirror, so install.sh must stop, say why and point at --template."""
    m = boot_machine(install_releases)
    done = m.run(["bash", f"{MNT}/install.sh", tarball(A)], check=False, timeout=600)
    assert done.returncode == 1, done.stderr
    err = done.stderr
    assert "install.sh: error: apt-get could not install debootstrap" in err, err
    assert "nothing was switched yet" in err and "--template FILE" in err, err
    assert "Traceback" not in err
    assert m.run(["test", "-e", "/opt/scalebox/current"], check=False).returncode == 1
    assert m.run(["systemctl", "is-active", "scaleboxd"], check=False).stdout.strip() != "active"
    assert "VM_BACKEND=nspawn" in m.run(["cat", "/etc/scaleboxd/config"]).stdout


# --- an offline server without ensurepip -----------------------------------------------


def test_a_server_without_python3_venv_is_refused_with_the_package_to_install(
    boot_machine: BootMachine, install_releases: Path
) -> None:
    """Offline server without ensurepip: install.sh names python3-venv and changes nothing."""
    m = boot_machine(install_releases)
    # The machine is a volatile overlay: hiding ensurepip here leaves the image intact.
    m.run(["sh", "-c", "mv /usr/lib/python3.11/ensurepip /root/ensurepip.hidden"])
    before = state(m)

    code, _out, err = install(m, tarball(A))

    assert code != 0
    assert "python3" in err and "-venv" in err, err
    assert state(m) == before
    assert m.run(["systemctl", "is-active", "scaleboxd"], check=False).stdout.strip() != "active"
