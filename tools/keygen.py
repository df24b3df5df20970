"""./do keygen: make the release-signing key pair in keys/ (the private key stays out of git).

    ./do keygen [--dir DIR]

Writes DIR/release.key (mode 0600) and DIR/release.pub. An existing key is
never overwritten: releases signed with it would no longer verify on the
servers that trust it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from scalebox.release import signing
from scalebox.release.errors import ReleaseError

ROOT = Path(__file__).resolve().parent.parent


def keygen(directory: Path) -> tuple[Path, Path]:
    private_path, public_path = directory / "release.key", directory / "release.pub"
    for path in (private_path, public_path):
        if path.exists():
            raise ReleaseError(
                f"{path} already exists; refusing to overwrite a release key",
                "servers trust that key: keep it. To start over, move both files away first",
            )
    directory.mkdir(parents=True, exist_ok=True)
    private, public = signing.generate()
    # O_EXCL: a key that appeared meanwhile is not overwritten either; 0600 from the start.
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    fd = os.open(public_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(public)
    return private_path, public_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./do keygen", description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=ROOT / "keys", help="default: keys/")
    args = parser.parse_args(argv)
    try:
        private_path, public_path = keygen(args.dir)
    except ReleaseError as exc:
        print(f"keygen: error: {exc}", file=sys.stderr)
        return 1
    key = signing.load_public_key(public_path)
    print(f"wrote {private_path} (secret, mode 0600) and {public_path}")
    print(f"fingerprint {key.fingerprint}")
    print("For CI, store the content of release.key in the secret SCALEBOX_SIGNING_KEY.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
