"""Choosing the SSH public key a new VM will accept.

The key is sent to the server, so a private key must never be taken for a
public one: a file that holds a private key is refused before anything is sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from scalebox.errors import UsageError

DEFAULT_KEY_NAMES = ("id_ed25519.pub", "id_rsa.pub")

_KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)


def check_public_key(text: str, where: str) -> str:
    """Return the one public key line in ``text`` or raise UsageError saying what is wrong."""
    if "PRIVATE KEY" in text:
        raise UsageError(
            f"{where} holds a PRIVATE key; it was not sent",
            "pass the public half, the file ending in .pub",
        )
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) != 1:
        raise UsageError(
            f"{where} holds {len(lines)} lines; expected one SSH public key",
            "pass a single key such as ~/.ssh/id_ed25519.pub",
        )
    fields = lines[0].split()
    if len(fields) < 2 or fields[0] not in _KEY_TYPES:
        raise UsageError(
            f"{where} is not an SSH public key (expected 'ssh-ed25519 AAAA... comment')",
            "create one with `ssh-keygen -t ed25519` and pass the .pub file",
        )
    return lines[0]


# Public keys are a few hundred bytes, and the API takes 16 KiB of them: more is not a
# key file (/dev/zero filled the memory).
MAX_KEY_FILE_BYTES = 64 * 1024


def read_public_key(path: Path) -> str:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_KEY_FILE_BYTES + 1)
        if len(data) > MAX_KEY_FILE_BYTES:
            raise UsageError(
                f"{path} is larger than {MAX_KEY_FILE_BYTES // 1024} KiB: not an SSH public key",
                "pass --ssh-key FILE with a .pub file",
            )
        text = data.decode()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(
            f"cannot read SSH public key {path}: {exc}", "pass --ssh-key FILE with a .pub file"
        ) from None
    return check_public_key(text, str(path))


def read_key_argument(value: str) -> str:
    """``-k KEY`` is the key itself; ``-k @FILE`` reads it from FILE, as upstream's client does."""
    if not value.startswith("@"):
        return check_public_key(value, "-k/--key")
    path = Path(value[1:]).expanduser()
    if not path.is_file():
        raise UsageError(
            f"-k {value}: no such file {path}", "pass -k @FILE with an existing .pub file"
        )
    return read_public_key(path)


def choose_public_key(
    key_file: Path | None,
    key_text: str | None,
    ssh_dir: Path,
    names: Sequence[str] = (),
    *,
    key_arg: str | None = None,
) -> str:
    """-k KEY|@FILE, --ssh-key FILE or --ssh-public-key STR, else the first default key."""
    given = [
        option
        for option, value in (
            ("-k/--key", key_arg),
            ("--ssh-key", key_file),
            ("--ssh-public-key", key_text),
        )
        if value is not None
    ]
    if len(given) > 1:
        both = "both " if len(given) == 2 else ""
        raise UsageError(f"{' and '.join(given)} were {both}given", "pass only one of them")
    if key_arg is not None:
        return read_key_argument(key_arg)
    if key_file is not None:
        return read_public_key(key_file)
    if key_text is not None:
        return check_public_key(key_text, "--ssh-public-key")
    candidates = [ssh_dir / name for name in (names or DEFAULT_KEY_NAMES)]
    for candidate in candidates:
        if candidate.is_file():
            return read_public_key(candidate)
    raise UsageError(
        f"no SSH public key given and none found at {' or '.join(map(str, candidates))}",
        "pass --ssh-key FILE or --ssh-public-key 'ssh-ed25519 AAAA...', "
        "or create one with `ssh-keygen -t ed25519`",
    )
