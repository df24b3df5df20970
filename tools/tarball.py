"""./do tarball: build the signed release builds/scalebox-<version>-<arch>.tar.gz.

    ./do tarball [--version V] [--src DIR] [--out DIR] [--key PATH]

--src builds from another copy of the project (tests make releases A, B and
broken ones that way); --version overrides __version__ in a temporary copy of
the sources, never in the working tree. The signing key comes from --key,
else SCALEBOX_SIGNING_KEY (PEM text, for CI secrets), else
SCALEBOX_SIGNING_KEY_FILE, else keys/release.key.

Wheels of the pinned dependencies (uv.lock) for every supported Python are
cached in .cache/wheels, so only the first build needs a package registry.
See docs/release-format.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from scalebox.release import build, manifest, signing
from scalebox.release.errors import ReleaseError

ROOT = Path(__file__).resolve().parent.parent
# Debian 12 ships python3 3.11, Debian 13 ships 3.13.
PYTHONS = ("3.11", "3.13")
# The oldest glibc among the supported Debian releases (Debian 12: 2.36); pip does not
# expand manylinux_2_X tags by itself, so every compatible tag is listed.
GLIBC_MINOR = 36
SOURCE_FILES = ("pyproject.toml", "README.md", "uv.lock", "LICENSE")
SOURCE_DIRS = ("src", "units", "scripts", "docs")
_VERSION_LINE = re.compile(r'^__version__ = "([^"]+)"$', re.MULTILINE)
_PEP440 = re.compile(
    r"^\d+(\.\d+)*((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?(\+[a-z0-9]+(\.[a-z0-9]+)*)?$"
)


def log(message: str) -> None:
    print(f"==> {message}", file=sys.stderr, flush=True)


def run(
    cmd: Sequence[str | Path],
    *,
    description: str,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> str:
    """Run one command; its output is shown only when it fails."""
    result = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, env=env, cwd=cwd, check=False
    )
    if result.returncode != 0:
        output = "\n".join(
            line
            for line in (result.stdout + result.stderr).splitlines()
            if "is ignored: it is neither a file nor a directory" not in line
        )
        raise ReleaseError(
            f"{description} failed (exit {result.returncode}):\n{output[-3000:]}",
            "fix the problem above and run ./do tarball again",
        )
    return result.stdout


DEFAULT_KEY = ROOT / "keys" / "release.key"


def signing_key(
    key_path: Path | None, environ: Mapping[str, str], default: Path = DEFAULT_KEY
) -> Ed25519PrivateKey:
    """--key, else SCALEBOX_SIGNING_KEY (PEM text), else SCALEBOX_SIGNING_KEY_FILE, else keys/."""
    if key_path is not None:
        return _key_from_file(key_path, "--key")
    if environ.get("SCALEBOX_SIGNING_KEY", "").strip():
        return signing.load_private_key(
            environ["SCALEBOX_SIGNING_KEY"].encode(), "SCALEBOX_SIGNING_KEY"
        )
    if environ.get("SCALEBOX_SIGNING_KEY_FILE"):
        return _key_from_file(
            Path(environ["SCALEBOX_SIGNING_KEY_FILE"]), "SCALEBOX_SIGNING_KEY_FILE"
        )
    if not default.exists():
        raise ReleaseError(
            "no release-signing key: SCALEBOX_SIGNING_KEY and SCALEBOX_SIGNING_KEY_FILE are "
            f"unset and {default} does not exist",
            "run ./do keygen once (it writes keys/release.key), or set SCALEBOX_SIGNING_KEY",
        )
    return _key_from_file(default, str(default))


def _key_from_file(path: Path, source: str) -> Ed25519PrivateKey:
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise ReleaseError(
            f"cannot read the signing key {path} (from {source}): {exc.strerror}",
            "check the path, or run ./do keygen to make keys/release.key",
        ) from None
    return signing.load_private_key(pem, str(path))


def copy_sources(src: Path, dest: Path, version: str | None) -> str:
    """Copy what a release is built from into ``dest``; return its (maybe overridden) version."""
    if not (src / "pyproject.toml").is_file():
        raise ReleaseError(f"{src} has no pyproject.toml", "--src must be a scalebox project")
    dest.mkdir(parents=True)
    for name in SOURCE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dest / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".*")
    for name in SOURCE_DIRS:
        if (src / name).is_dir():
            shutil.copytree(src / name, dest / name, ignore=ignore)
    init = dest / "src" / "scalebox" / "__init__.py"
    text = init.read_text()
    match = _VERSION_LINE.search(text)
    if match is None:
        raise ReleaseError(f"no __version__ line in {init}", 'add __version__ = "X.Y.Z"')
    if version is None:
        return match.group(1)
    if not _PEP440.match(version):
        raise ReleaseError(
            f"--version {version!r} is not a normalized PEP 440 version",
            "use a version such as 1.2.3, 1.2.3rc1 or 1.2.3.dev4",
        )
    init.write_text(_VERSION_LINE.sub(f'__version__ = "{version}"', text))
    return version


def _pip_env() -> dict[str, str]:
    # The host's PIP_FIND_LINKS would let wheels from elsewhere into the release.
    return {k: v for k, v in os.environ.items() if k != "PIP_FIND_LINKS"}


def _pip() -> list[str]:
    tools_python = ROOT / ".tools" / "bin" / "python"
    return [str(tools_python if tools_python.exists() else sys.executable), "-m", "pip"]


def _uv() -> str:
    uv = ROOT / ".tools" / "bin" / "uv"
    if not uv.exists():
        raise ReleaseError(f"{uv} is missing", "run ./do setup")
    return str(uv)


def build_wheel(src: Path, out_dir: Path, cache: Path, epoch: int) -> Path:
    """The scalebox wheel, built offline from the cached build backend when possible."""
    requires = tomllib.loads((src / "pyproject.toml").read_text())["build-system"]["requires"]
    build_cache = cache / "build"
    env = {
        **_pip_env(),
        "SOURCE_DATE_EPOCH": str(epoch),
        "UV_PYTHON_DOWNLOADS": "never",
        "UV_NO_CONFIG": "1",
    }
    cmd = [
        _uv(),
        "build",
        "--wheel",
        "--quiet",
        "--out-dir",
        str(out_dir),
        "--no-index",
        "--find-links",
        str(build_cache),
        str(src),
    ]
    try:
        run(cmd, description="building the scalebox wheel offline", env=env)
    except ReleaseError:
        log(f"fetching the build backend ({', '.join(requires)}) into {build_cache}")
        run(
            [*_pip(), "download", "--quiet", "--dest", str(build_cache), *requires],
            description="downloading the build backend",
            env=_pip_env(),
        )
        run(cmd, description="building the scalebox wheel", env=env)
    wheels = sorted(out_dir.glob("scalebox-*.whl"))
    if len(wheels) != 1:
        raise ReleaseError(
            f"expected one scalebox wheel in {out_dir}, found {wheels}",
            "check the build output above",
        )
    return wheels[0]


def platform_tags(arch: str) -> list[str]:
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(GLIBC_MINOR, 16, -1)]
    return [*tags, f"manylinux2014_{arch}", f"manylinux2010_{arch}", f"manylinux1_{arch}"]


def target_args(python: str, arch: str) -> list[str]:
    args = ["--only-binary=:all:", "--implementation", "cp", "--python-version", python]
    for tag in platform_tags(arch):
        args += ["--platform", tag]
    return args


def fetch_dependency_wheels(src: Path, python: str, arch: str, cache: Path, dest: Path) -> None:
    """Copy into ``dest`` the wheels of every pin in uv.lock for ``python``, via the cache."""
    pins = src / "pins.txt"
    if not pins.exists():
        if not (src / "uv.lock").is_file():
            raise ReleaseError(f"{src} has no uv.lock", "run ./do lock in the source tree")
        # With hashes: pip then refuses any wheel whose bytes uv.lock did not pin.
        text = run(
            [_uv(), "export", "--frozen", "--no-dev", "--no-emit-project", "--quiet"],
            description="exporting pins from uv.lock",
            cwd=src,
            env={**_pip_env(), "UV_NO_CONFIG": "1"},
        )
        pins.write_text(text)
    common = ["download", "--no-deps", "--quiet", *target_args(python, arch), "-r", str(pins)]
    offline = [
        *_pip(),
        "--isolated",
        *common,
        "--no-index",
        "--find-links",
        str(cache),
        "--dest",
        str(dest),
    ]
    try:
        run(offline, description=f"collecting wheels for Python {python}", env=_pip_env())
    except ReleaseError:
        log(f"downloading wheels for Python {python} ({arch}) into {cache}")
        run(
            [*_pip(), *common, "--dest", str(cache)],
            description=f"downloading wheels for Python {python}",
            env=_pip_env(),
        )
        run(offline, description=f"collecting wheels for Python {python}", env=_pip_env())


def check_installable(wheels: Path, version: str, python: str, arch: str, scratch: Path) -> None:
    """Prove the wheel set alone resolves scalebox==version for ``python`` (as install.sh will)."""
    run(
        [
            *_pip(),
            "--isolated",
            "install",
            "--dry-run",
            "--quiet",
            "--no-index",
            "--find-links",
            str(wheels),
            *target_args(python, arch),
            "--target",
            str(scratch / f"t{python}"),
            f"scalebox=={version}",
        ],
        description=f"resolving scalebox=={version} offline for Python {python}",
        env=_pip_env(),
    )


def debian_packages(pyproject: Mapping[str, object]) -> list[str]:
    """``[tool.scalebox] debian-packages`` of pyproject.toml: what the release needs installed."""
    tool = pyproject.get("tool", {})
    table = tool.get("scalebox", {}) if isinstance(tool, dict) else {}
    value = table.get("debian-packages", []) if isinstance(table, dict) else []
    try:
        return list(manifest.parse_debian_packages(value))
    except ReleaseError:
        raise ReleaseError(
            f"pyproject.toml [tool.scalebox] debian-packages = {value!r} is not a list of "
            "Debian package names",
            'write e.g. debian-packages = ["python3", "python3-venv", "systemd"]',
        ) from None


def release_migrations(sources: Path) -> list[manifest.MigrationInfo]:
    """The migrations of the sources being built, as their own code lists them."""
    if not (sources / "src" / "scalebox" / "migrations").is_dir():
        return []  # sources from before migrations existed
    # A fresh interpreter that imports the built sources, not this checkout's scalebox.
    out = run(
        [sys.executable, "-m", "scalebox.migrations", "list", "--json"],
        description="listing the release's migrations",
        env={**_pip_env(), "PYTHONPATH": str(sources / "src"), "PYTHONDONTWRITEBYTECODE": "1"},
        cwd=sources,
    )
    try:
        return list(manifest.parse_migrations(json.loads(out)))
    except (ValueError, ReleaseError) as exc:
        raise ReleaseError(
            f"the release's migration list is malformed: {exc}",
            "check src/scalebox/migrations/steps.py",
        ) from None


def build_release(
    src: Path,
    out_dir: Path,
    key: Ed25519PrivateKey,
    *,
    version: str | None = None,
    cache: Path = ROOT / ".cache" / "wheels",
    arch: str | None = None,
) -> Path:
    """Build, seal and pack a release from the project at ``src``; return the tarball path."""
    arch = arch or platform.machine()
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", build.DEFAULT_EPOCH))
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="scalebox-tarball-") as tmp_name:
        tmp = Path(tmp_name)
        sources = tmp / "src"
        version = copy_sources(src, sources, version)
        pyproject = tomllib.loads((sources / "pyproject.toml").read_text())
        project = pyproject["project"]
        packages = debian_packages(pyproject)
        migrations = release_migrations(sources)
        entry_points = sorted(project.get("scripts", {}))
        tree = tmp / "tree"
        wheels = tree / "wheels"
        wheels.mkdir(parents=True)
        log(f"building scalebox {version} for {arch}")
        wheel = build_wheel(sources, tmp / "dist", cache, epoch)
        shutil.copy2(wheel, wheels / wheel.name)
        for python in PYTHONS:
            fetch_dependency_wheels(sources, python, arch, cache, wheels)
            check_installable(wheels, version, python, arch, tmp)
        (tree / "units").mkdir()
        for unit in sorted((sources / "units").glob("*")) if (sources / "units").is_dir() else []:
            if unit.is_file():
                shutil.copy2(unit, tree / "units" / unit.name)
        # The units' Documentation= and the updater's hints name docs/operations.md
        # under /opt/scalebox/current: ship the operator docs so those paths are true.
        docs = sorted((sources / "docs").glob("*.md")) if (sources / "docs").is_dir() else []
        if docs:
            (tree / "docs").mkdir()
            for doc in docs:
                shutil.copy2(doc, tree / "docs" / doc.name)
        install_sh = sources / manifest.INSTALL_SCRIPT
        if install_sh.is_file():
            (tree / "scripts").mkdir()
            shutil.copy2(install_sh, tree / manifest.INSTALL_SCRIPT)
            (tree / manifest.INSTALL_SCRIPT).chmod(0o755)
        (tree / "keys").mkdir()
        (tree / manifest.SHIPPED_KEY).write_bytes(signing.public_pem(key.public_key()))
        for path in tree.rglob("*"):
            if path.is_file() and path != tree / manifest.INSTALL_SCRIPT:
                path.chmod(0o644)
        release = build.make_manifest(
            tree,
            version=version,
            arch=arch,
            python=PYTHONS,
            entry_points=entry_points,
            migrations=migrations,
            debian_packages=packages,
        )
        build.seal(tree, release, key)
        out = out_dir / f"{release.top_dir}.tar.gz"
        return build.write_tarball(tree, out, release.top_dir, mtime=epoch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./do tarball", description=__doc__.splitlines()[0])
    parser.add_argument("--version", help="override __version__ (in a temporary copy)")
    parser.add_argument("--src", type=Path, default=ROOT, help="project to build (default: .)")
    parser.add_argument("--out", type=Path, default=ROOT / "builds", help="default: builds/")
    parser.add_argument("--key", type=Path, help="signing key (PEM); see the module doc")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        key = signing_key(args.key, os.environ)
        out = build_release(args.src.resolve(), args.out.resolve(), key, version=args.version)
    except ReleaseError as exc:
        print(f"tarball: error: {exc}", file=sys.stderr)
        return 1
    log(
        f"built {out} in {time.monotonic() - started:.1f}s "
        f"(signed by {signing.fingerprint(key.public_key())})"
    )
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
