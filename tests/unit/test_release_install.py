"""install.sh and bootstrap.sh on a real release, into a scratch root.

SCALEBOX_INSTALL_ROOT makes install.sh lay out every file under a temporary
directory and skip systemd and the health check (the real server run is
`./do check`, in a systemd machine). Everything else is real: the release is
built by tools/tarball.py, verified by its own verifier, installed into real
venvs from its wheels with no index, and the scripts run as real bash.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import re
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from tools import tarball

from scalebox.release import build, manifest, signing
from scalebox.release.verify import open_release
from scalebox.update import stage
from scalebox.update.paths import Paths

ROOT = Path(__file__).resolve().parents[2]
INSTALL_SH = ROOT / "scripts" / "install.sh"
BOOTSTRAP_SH = ROOT / "scripts" / "bootstrap.sh"
ARCH = platform.machine()
VERSION = "7.7.7"
PROGRAMS = ("scalebox", "scalebox-update", "scaleboxd")


@dataclass(frozen=True)
class Built:
    tarball: Path
    key: Ed25519PrivateKey
    pub: Path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    tmp = tmp_path_factory.mktemp("release")
    private_pem, public_pem = signing.generate()
    key = signing.load_private_key(private_pem, "test")
    (tmp / "release.pub").write_bytes(public_pem)
    path = tarball.build_release(ROOT, tmp / "out", key, version=VERSION)
    return Built(path, key, tmp / "release.pub")


def run_script(
    script: Path, root: Path, *args: str | Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "SCALEBOX_INSTALL_ROOT": str(root), **(env or {})}
    return subprocess.run(
        ["bash", str(script), *map(str, args)],
        capture_output=True,
        text=True,
        env=environ,
        check=False,
        timeout=600,
    )


def snapshot(root: Path) -> dict[str, tuple[int, int, bytes | str]]:
    """Every path under root with its mode, mtime and content (or link target)."""
    state: dict[str, tuple[int, int, bytes | str]] = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        if path.is_symlink():
            content: bytes | str = str(path.readlink())
        elif path.is_file():
            content = path.read_bytes()
        else:
            content = ""
        state[str(path.relative_to(root))] = (info.st_mode, info.st_mtime_ns, content)
    return state


def repack(built: Built, tmp: Path, **changes: str) -> Path:
    """The built release with manifest fields changed and signed again with the same key."""
    release = open_release(built.tarball, tmp / "unpacked", [built.pub])
    parsed = manifest.parse((release.root / manifest.MANIFEST).read_bytes())
    changed = dataclasses.replace(parsed, **changes)  # type: ignore[arg-type]
    data = changed.to_bytes()
    (release.root / manifest.MANIFEST).write_bytes(data)
    (release.root / manifest.SIGNATURE).write_bytes(signing.sign(built.key, data))
    return build.write_tarball(release.root, tmp / f"{changed.top_dir}.tar.gz", changed.top_dir)


@pytest.fixture(scope="module")
def installed(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A first install into a scratch root; its output is kept for the tests to read."""
    root = tmp_path_factory.mktemp("server")
    result = run_script(INSTALL_SH, root, built.tarball)
    (root.parent / f"{root.name}.out").write_text(result.stdout + result.stderr)
    assert result.returncode == 0, result.stdout + result.stderr
    yield root


def test_first_install_lays_out_the_release(installed: Path) -> None:
    release_dir = installed / "opt/scalebox/releases" / VERSION
    assert (release_dir / ".complete").is_file()
    assert (release_dir / "RELEASE.json").is_file()
    assert (release_dir / "RELEASE.json.sig").is_file()
    assert {p.name for p in (release_dir / "units").iterdir()} == {
        p.name for p in (ROOT / "units").iterdir()
    }
    assert str((installed / "opt/scalebox/current").readlink()) == f"releases/{VERSION}"
    for name in PROGRAMS:
        link = installed / "usr/local/bin" / name
        assert str(link.readlink()) == f"{installed}/opt/scalebox/current/venv/bin/{name}"
        assert os.access(link, os.X_OK)
    for unit in (ROOT / "units").iterdir():
        assert (installed / "etc/systemd/system" / unit.name).read_bytes() == unit.read_bytes()
    assert (installed / "etc/scaleboxd/version").read_text() == f"{VERSION}\n"
    # Built as scalebox-update stages a release: no pip, and a record of every file.
    assert not (release_dir / "venv" / "bin" / "pip").exists()
    assert stage.unchanged(release_dir)


def test_the_first_update_after_install_shares_what_it_can(built: Built, tmp_path: Path) -> None:
    root = tmp_path / "root"
    result = run_script(INSTALL_SH, root, built.tarball)
    assert result.returncode == 0, result.stdout + result.stderr
    # The installed release plays the running one at another version, so that the
    # same tarball can be staged next to it.
    paths = Paths(root)
    paths.release_dir(VERSION).rename(paths.release_dir("7.7.6"))
    paths.current.unlink()
    paths.current.symlink_to("releases/7.7.6")
    release = open_release(built.tarball, tmp_path / "open", [built.pub])
    assert stage.build(paths, release.root, VERSION, python="python3", report=lambda _: None)
    venv = paths.release_dir(VERSION) / "venv"
    mine = next((venv / "lib").glob("python3.*")) / "site-packages"
    theirs = paths.release_dir("7.7.6") / "venv" / mine.relative_to(venv)
    apart = [
        p.relative_to(mine).as_posix()
        for p in mine.rglob("*")
        if p.is_file() and p.stat().st_ino != (theirs / p.relative_to(mine)).stat().st_ino
    ]
    # Every file, each module's .pyc included (at most the RECORDs that hash the scripts
    # differ; here not even those: the renamed release's scripts name this same path).
    assert all(rel.endswith(".dist-info/RECORD") for rel in apart), apart
    assert len(list(mine.rglob("*.pyc"))) > 1000


def test_installed_daemon_is_the_release_version(installed: Path) -> None:
    result = subprocess.run(
        [str(installed / "usr/local/bin/scaleboxd"), "--version"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert VERSION in result.stdout


def test_first_install_writes_a_private_config_with_a_fresh_token(installed: Path) -> None:
    config = installed / "etc/scaleboxd/config"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    text = config.read_text()
    assert re.search(r"^API_TOKEN=sb-[0-9a-f]{48}$", text, re.MULTILINE)
    assert re.search(r"^HOST_IP=\d+\.\d+\.\d+\.\d+$", text, re.MULTILINE)
    assert "#   PORT_MIN=22001" in text  # the header documents keys and defaults
    token = re.search(r"^API_TOKEN=(\S+)$", text, re.MULTILINE)
    assert token is not None
    output = (installed.parent / f"{installed.name}.out").read_text()
    assert f"Token: {token.group(1)}" in output
    assert "API:   http://" in output


def test_first_install_trusts_the_shipped_key(installed: Path, built: Built) -> None:
    trusted = installed / "etc/scalebox/keys/release.pub"
    assert trusted.read_bytes() == built.pub.read_bytes()


def test_second_run_changes_nothing_and_says_so(installed: Path, built: Built) -> None:
    before = snapshot(installed)
    result = run_script(INSTALL_SH, installed, built.tarball)
    assert result.returncode == 0, result.stderr
    assert "nothing changed" in result.stdout
    assert snapshot(installed) == before


def test_other_version_over_an_install_is_refused(
    installed: Path, built: Built, tmp_path: Path
) -> None:
    newer = repack(built, tmp_path, version="7.7.8")
    before = snapshot(installed)
    result = run_script(INSTALL_SH, installed, newer)
    assert result.returncode != 0
    assert "scalebox 7.7.7 is installed here" in result.stderr
    assert "scalebox-update" in result.stderr
    assert snapshot(installed) == before


def refused_and_untouched(
    result: subprocess.CompletedProcess[str], root: Path, reason: str
) -> None:
    assert result.returncode != 0
    assert reason in result.stderr, result.stderr
    assert list(root.rglob("*")) == []


def test_not_root_is_refused_before_anything(built: Built, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    result = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "bash", str(INSTALL_SH)],
        capture_output=True,
        text=True,
        env={**os.environ, "SCALEBOX_INSTALL_ROOT": str(root)},
        check=False,
    )
    refused_and_untouched(result, root, "Must run as root. Try: sudo bash install.sh")


def test_corrupt_tarball_changes_nothing(built: Built, tmp_path: Path) -> None:
    data = bytearray(built.tarball.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt = tmp_path / built.tarball.name
    corrupt.write_bytes(bytes(data))
    root = tmp_path / "root"
    root.mkdir()
    result = run_script(INSTALL_SH, root, corrupt)
    refused_and_untouched(result, root, "install.sh: error:")


def test_release_signed_by_an_untrusted_key_changes_nothing(built: Built, tmp_path: Path) -> None:
    root = tmp_path / "root"
    keys = root / "etc/scalebox/keys"
    keys.mkdir(parents=True)
    (keys / "other.pub").write_bytes(signing.generate()[1])
    result = run_script(INSTALL_SH, root, built.tarball)
    assert result.returncode != 0
    assert "not signed by a trusted key" in result.stderr
    assert "nothing was changed" in result.stderr
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == [
        "etc",
        "etc/scalebox",
        "etc/scalebox/keys",
        "etc/scalebox/keys/other.pub",
    ]


def test_release_for_another_arch_changes_nothing(built: Built, tmp_path: Path) -> None:
    other = "aarch64" if ARCH != "aarch64" else "x86_64"
    foreign = repack(built, tmp_path, arch=other)
    root = tmp_path / "root"
    root.mkdir()
    result = run_script(INSTALL_SH, root, foreign)
    refused_and_untouched(result, root, f"the release is for {other}, this machine is {ARCH}")


def test_config_the_release_refuses_is_kept_and_nothing_is_switched(
    built: Built, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    config = root / "etc/scaleboxd/config"
    config.parent.mkdir(parents=True)
    config.write_text("API_TOKEN=short\n")
    result = run_script(INSTALL_SH, root, built.tarball)
    assert result.returncode != 0
    assert f"scaleboxd {VERSION} refuses the config" in result.stderr
    assert "API_TOKEN" in result.stderr  # the daemon's own reason is shown
    assert config.read_text() == "API_TOKEN=short\n"
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == [
        "etc",
        "etc/scaleboxd",
        "etc/scaleboxd/config",
        "opt",
    ]


def test_missing_tarball_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    result = run_script(INSTALL_SH, root, tmp_path / "scalebox-1.0.0-x86_64.tar.gz")
    refused_and_untouched(result, root, "does not exist or is not readable")


def test_bootstrap_installs_from_a_release_url_and_keeps_an_existing_config(
    built: Built, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    config = root / "etc/scaleboxd/config"
    config.parent.mkdir(parents=True)
    mine = "API_TOKEN=sb-" + "c" * 48 + "\nHOST_IP=10.1.2.3\nPORT_MIN=23000\n"
    config.write_text(mine)
    config.chmod(0o600)
    result = run_script(BOOTSTRAP_SH, root, env={"SCALEBOX_RELEASE_URL": f"file://{built.tarball}"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert config.read_text() == mine
    assert "Token: sb-" + "c" * 48 in result.stdout
    assert "API:   http://10.1.2.3:8080" in result.stdout
    assert (root / "opt/scalebox/releases" / VERSION / ".complete").is_file()


def test_bootstrap_refuses_plain_http(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    result = run_script(
        BOOTSTRAP_SH, root, env={"SCALEBOX_RELEASE_URL": "http://127.0.0.1:9/x.tar.gz"}
    )
    refused_and_untouched(result, root, "refusing the plain http URL")


def test_a_program_name_that_is_a_path_is_refused(built: Built, tmp_path: Path) -> None:
    """entry_points become /usr/local/bin/<name>: '../../etc/evil' must never be one."""
    hostile = repack(built, tmp_path, entry_points=(*PROGRAMS, "../../etc/evil"))
    root = tmp_path / "root"
    root.mkdir()
    result = run_script(INSTALL_SH, root, hostile)
    # The shipped verifier refuses it first; install.sh's own check is the second layer.
    refused_and_untouched(result, root, "'../../etc/evil'")
    assert "not a plain" in result.stderr, result.stderr
    assert "nothing was changed" in result.stderr


def test_a_key_option_that_is_not_an_ed25519_key_is_refused(built: Built, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    result = run_script(INSTALL_SH, root, "--key", built.tarball, built.tarball)
    refused_and_untouched(result, root, "is not an ed25519 public key in PEM form")


def test_a_pinned_key_installs_its_release_and_is_the_key_trusted(
    built: Built, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    other = tmp_path / "other.pub"
    other.write_bytes(signing.generate()[1])
    result = run_script(INSTALL_SH, root, "--key", other, built.tarball)
    refused_and_untouched(result, root, "is not signed by a trusted key")
    result = run_script(INSTALL_SH, root, "--key", built.pub, built.tarball)
    assert result.returncode == 0, result.stderr
    assert "signed by the pinned key" in result.stdout
    keys = root / "etc/scalebox/keys"
    assert [p.name for p in keys.iterdir()] == ["release.pub"]
    assert (keys / "release.pub").read_bytes() == built.pub.read_bytes()
    # Installed: now the installed release's verifier checks, against the --key file alone.
    before = snapshot(root)
    result = run_script(INSTALL_SH, root, "--key", other, built.tarball)
    assert result.returncode == 1
    assert "not signed by a trusted key" in result.stderr
    result = run_script(INSTALL_SH, root, "--key", built.pub, built.tarball)
    assert result.returncode == 0, result.stderr
    assert "nothing changed" in result.stdout
    assert snapshot(root) == before
