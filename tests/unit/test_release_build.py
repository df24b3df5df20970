"""./do tarball and ./do keygen: a real release is built, verifies, and builds the same twice.

The builds run the real `./do tarball` (uv build, pip download into
.cache/wheels: the first run on a machine needs the package registry, later
ones are offline) with a key made in tmp_path.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tools import keygen, releases, tarball

from scalebox.release import signing
from scalebox.release.errors import ReleaseError
from scalebox.release.verify import Release, open_release

ROOT = Path(__file__).resolve().parents[2]
ARCH = platform.machine()
VERSION = "9.9.9"


def do_tarball(
    *args: str | Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ROOT / "do"), "tarball", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        timeout=900,
    )


@dataclass(frozen=True)
class Built:
    pub: Path
    first: Path
    second: Path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    """The same sources built twice with the same key, into two directories."""
    tmp = tmp_path_factory.mktemp("build")
    private, pub = keygen.keygen(tmp / "keys")
    paths = []
    for name in ("one", "two"):
        result = do_tarball("--version", VERSION, "--key", private, "--out", tmp / name)
        assert result.returncode == 0, result.stderr
        paths.append(Path(result.stdout.strip()))
    yield Built(pub, paths[0], paths[1])


def open_built(path: Path, dest: Path, pub: Path) -> Release:
    return open_release(path, dest, [pub])


def test_tarball_is_named_for_version_and_arch(built: Built) -> None:
    assert built.first.name == f"scalebox-{VERSION}-{ARCH}.tar.gz"


def test_built_release_verifies_and_holds_everything_install_needs(
    built: Built, tmp_path: Path
) -> None:
    release = open_built(built.first, tmp_path / "dest", built.pub)
    assert release.version == VERSION
    assert release.python == ("3.11", "3.13")
    assert release.entry_points == ("scalebox", "scalebox-update", "scaleboxd")
    assert set(release.units) == {p.name for p in (ROOT / "units").iterdir()}
    wheels = {p.name for p in release.wheels_dir.iterdir()}
    assert f"scalebox-{VERSION}-py3-none-any.whl" in wheels
    for python in ("cp311", "cp313"):  # compiled dependencies exist for both Debian Pythons
        assert any(w.startswith("pydantic_core-") and f"-{python}-" in w for w in wheels)
    assert any(w.startswith("cryptography-") for w in wheels)
    assert (release.root / "scripts" / "install.sh").read_bytes() == (
        ROOT / "scripts" / "install.sh"
    ).read_bytes()
    shipped = signing.load_public_key(release.root / "keys" / "release.pub")
    assert shipped.fingerprint == signing.load_public_key(built.pub).fingerprint


def test_the_signed_manifest_comes_first_and_packaging_is_shipped(built: Built) -> None:
    """A reader checks RELEASE.json and its signature before it writes anything."""
    with tarfile.open(built.first) as archive:
        names = [m.name.split("/", 1)[-1] for m in archive.getmembers()[:5]]
        wheels = [m.name for m in archive.getmembers() if "/wheels/packaging-" in m.name]
    assert names[1:] == ["RELEASE.json", "RELEASE.json.sig", "keys", "keys/release.pub"]
    assert wheels, "packaging (versions.py) is a runtime dependency"


def test_the_docs_the_units_point_at_are_in_the_release(built: Built, tmp_path: Path) -> None:
    release = open_built(built.first, tmp_path / "dest", built.pub)
    assert (release.root / "docs" / "operations.md").read_bytes() == (
        ROOT / "docs" / "operations.md"
    ).read_bytes()
    prefix = "Documentation=file:///opt/scalebox/current/"
    for unit in (ROOT / "units").iterdir():
        for line in unit.read_text().splitlines():
            if line.startswith("Documentation=file://"):
                assert line.startswith(prefix), (unit.name, line)
                assert (release.root / line.removeprefix(prefix)).is_file(), (unit.name, line)


def test_version_override_never_touches_the_working_tree(built: Built) -> None:
    init = (ROOT / "src" / "scalebox" / "__init__.py").read_text()
    assert f'"{VERSION}"' not in init


def test_two_builds_of_the_same_sources_are_identical(built: Built, tmp_path: Path) -> None:
    one = open_built(built.first, tmp_path / "one", built.pub)
    two = open_built(built.second, tmp_path / "two", built.pub)
    assert one.manifest["files"] == two.manifest["files"]
    assert (one.root / "RELEASE.json").read_bytes() == (two.root / "RELEASE.json").read_bytes()
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (built.first, built.second)]
    assert digest[0] == digest[1]


def copy_project(dest: Path) -> Path:
    for name in ("pyproject.toml", "README.md", "uv.lock"):
        shutil.copy2(ROOT / name, dest / name)
    for name in ("src", "units", "scripts"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def test_incomplete_release_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    private, _ = keygen.keygen(tmp_path / "keys")
    (tmp_path / "src-copy").mkdir()
    src = copy_project(tmp_path / "src-copy")
    (src / "scripts" / "install.sh").unlink()
    result = do_tarball("--src", src, "--key", private, "--out", tmp_path / "out")
    assert result.returncode != 0
    assert "refusing to build an incomplete release: it lacks scripts/install.sh" in result.stderr
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_bad_version_is_refused(tmp_path: Path) -> None:
    private, _ = keygen.keygen(tmp_path / "keys")
    result = do_tarball("--version", "../1", "--key", private, "--out", tmp_path / "out")
    assert result.returncode != 0
    assert "is not a normalized PEP 440 version" in result.stderr


# --- keys -----------------------------------------------------------------------


def test_keygen_writes_a_private_key_only_its_owner_can_read(tmp_path: Path) -> None:
    assert keygen.main(["--dir", str(tmp_path / "keys")]) == 0
    private = tmp_path / "keys" / "release.key"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = signing.load_private_key(private.read_bytes(), "test")
    public = signing.load_public_key(tmp_path / "keys" / "release.pub")
    assert public.fingerprint == signing.fingerprint(key.public_key())


def test_keygen_never_overwrites_a_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert keygen.main(["--dir", str(tmp_path)]) == 0
    before = (tmp_path / "release.key").read_bytes()
    assert keygen.main(["--dir", str(tmp_path)]) != 0
    assert "refusing to overwrite a release key" in capsys.readouterr().err
    assert (tmp_path / "release.key").read_bytes() == before


def test_no_signing_key_fails_with_a_keygen_hint(tmp_path: Path) -> None:
    with pytest.raises(ReleaseError, match="no release-signing key") as caught:
        tarball.signing_key(None, {}, default=tmp_path / "absent.key")
    assert "./do keygen" in (caught.value.hint or "")


def test_do_tarball_with_an_unreadable_key_builds_nothing(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SCALEBOX_SIGNING_KEY"}
    env["SCALEBOX_SIGNING_KEY_FILE"] = str(tmp_path / "absent.key")
    result = do_tarball("--out", tmp_path / "out", env=env)
    assert result.returncode != 0
    assert "cannot read the signing key" in result.stderr
    assert "./do keygen" in result.stderr
    assert not (tmp_path / "out").exists()


def test_signing_key_comes_from_the_environment_first(tmp_path: Path) -> None:
    env_private, _ = signing.generate()
    file_private, _ = signing.generate()
    key_file = tmp_path / "file.key"
    key_file.write_bytes(file_private)
    default_key = tmp_path / "default.key"
    default_key.write_bytes(signing.generate()[0])

    def fp(environ: dict[str, str]) -> str:
        return signing.fingerprint(tarball.signing_key(None, environ, default_key).public_key())

    def fp_of(pem: bytes) -> str:
        return signing.fingerprint(signing.load_private_key(pem, "t").public_key())

    both = {
        "SCALEBOX_SIGNING_KEY": env_private.decode(),
        "SCALEBOX_SIGNING_KEY_FILE": str(key_file),
    }
    assert fp(both) == fp_of(env_private)
    assert fp({"SCALEBOX_SIGNING_KEY_FILE": str(key_file)}) == fp_of(file_private)
    assert fp({}) == fp_of(default_key.read_bytes())


def test_a_signing_key_that_is_not_pem_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ReleaseError, match="cannot be read"):
        tarball.signing_key(None, {"SCALEBOX_SIGNING_KEY": "not a key"}, tmp_path / "x")


@pytest.mark.parametrize("version", sorted({**releases.BROKEN, **releases.VARIANTS}))
def test_each_test_release_still_finds_the_text_it_changes(version: str) -> None:
    """The broken releases of the system tests and ./do bench replace one exact text of
    the sources; a change to that text must fail here, not a bench or a system test."""
    relpath, old, _new = {**releases.BROKEN, **releases.VARIANTS}[version]
    assert (ROOT / relpath).read_text().count(old) >= 1, f"{version}: {relpath}"
