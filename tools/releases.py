"""Test releases: real signed tarballs of this project, good and deliberately broken.

Shared by the system tests (tests/system/test_update.py) and ./do bench.
Each broken release is built by `./do tarball --src` from a copy of the
sources with one text change, so it fails in exactly one way; a variant
(VARIANTS) is built the same way and differs in one way that is not a fault.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

from scalebox.daemon.vms.templates import TEMPLATE_VERSION

ROOT = Path(__file__).resolve().parent.parent
ARCH = platform.machine()
A, B = "1.0.0", "1.1.0"
CRASH, HANG, WRONG, DIES, REJECTS = "1.2.0", "1.3.0", "1.4.0", "1.5.0", "1.6.0"


class ReleaseBuildFailed(Exception):
    """./do tarball failed; the message carries its stderr."""


def build_tarball(out: Path, key: Path, version: str, src: Path = ROOT) -> Path:
    """`./do tarball --version V --src SRC --key K --out OUT`; the tarball's path."""
    done = subprocess.run(
        [
            str(ROOT / "do"),
            "tarball",
            "--version",
            version,
            "--key",
            str(key),
            "--out",
            str(out),
            "--src",
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if done.returncode != 0:
        raise ReleaseBuildFailed(f"./do tarball --version {version} failed:\n{done.stderr}")
    return out / tarball_name(version)


def tarball_name(version: str) -> str:
    return f"scalebox-{version}-{ARCH}.tar.gz"


# Broken releases: (file, exact text, replacement).
SERVE = (
    "        exit_now(serve(load_config(args.config), args.config, args.bind, "
    "handover=args.handover))"
)
MAIN = "src/scalebox/daemon/main.py"
READY_LOG = '            log.info("scaleboxd %s ready%s", scalebox.__version__, role)\n'
BROKEN = {
    # exits before READY=1: `systemctl restart` fails at once
    CRASH: (MAIN, SERVE, "        raise SystemExit(70)"),
    # never sends READY=1: systemd's start timeout (TimeoutStartSec=30) fails it
    HANG: (MAIN, SERVE, "        import time\n        time.sleep(3600)\n        return 1"),
    # healthy, but /health reports another version
    WRONG: (
        "src/scalebox/daemon/app.py",
        '"version": scalebox.__version__}',
        '"version": "0.0.0+impostor"}',
    ),
    # becomes healthy, then dies 3 s later (inside the stability window). Counted from
    # its READY=1 as the main daemon: from its start, a start slower than 3 s (a lowered
    # start on a busy CI host, seen) died before it was ready, a failed restart instead.
    DIES: (
        "src/scalebox/daemon/httpserver.py",
        READY_LOG,
        READY_LOG
        + "            if not self.handover:\n"
        + "                import os\n"
        + "                threading.Timer(3.0, os._exit, (1,)).start()\n",
    ),
    # its config check rejects the live config
    REJECTS: (
        MAIN,
        "def check_config(path: Path) -> int:\n",
        "def check_config(path: Path) -> int:\n"
        '    print("scaleboxd: NEW_REQUIRED_KEY is not set", file=sys.stderr)\n'
        "    return 2\n",
    ),
}


# Releases that differ from this build in one way that is not a fault.
NEWER_TEMPLATE = "1.7.0"  # builds debian-base at the next template version
VARIANTS = {
    NEWER_TEMPLATE: (
        "src/scalebox/daemon/vms/templates.py",
        f"TEMPLATE_VERSION = {TEMPLATE_VERSION}\n",
        f"TEMPLATE_VERSION = {TEMPLATE_VERSION + 1}\n",
    ),
}


def broken_copy(tmp: Path, version: str) -> Path:
    """The project's sources with the one change BROKEN[version] (or VARIANTS[version]) makes."""
    src = tmp / f"src-{version}"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "uv.lock"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("src", "units", "scripts"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    relpath, old, new = {**BROKEN, **VARIANTS}[version]
    target = src / relpath
    text = target.read_text()
    if old not in text:
        raise ReleaseBuildFailed(
            f"{relpath} no longer contains the text that release {version} replaces: "
            "update BROKEN or VARIANTS in tools/releases.py"
        )
    target.write_text(text.replace(old, new, 1))
    return src
