"""The one way a migration changes /etc/scaleboxd/config: read keys, add a key.

Adding appends a comment and ``KEY=value`` at the end; every byte before it
stays as it was, and a key that is already set (by anyone) is left alone, so
adding is idempotent. ``save`` replaces the file atomically with the same
mode (0600) and owner. Keys are never renamed or removed
(docs/compatibility.md), so there is no API for that.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from scalebox import config
from scalebox.errors import ConfigError
from scalebox.fsutil import atomic_write
from scalebox.migrations.errors import MigrationError

_KEY = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
_FORBIDDEN = ("\n", "\r", "\0")


def read_values(text: bytes, source: str) -> dict[str, str]:
    """KEY -> value as scaleboxd reads the file (unquoted; the last assignment wins)."""
    try:
        found = config.parse_lines(text.decode("utf-8", "surrogateescape"), source)
    except ConfigError as exc:
        raise MigrationError(
            f"cannot read {source}: {exc.what}",
            "fix that line (scaleboxd would refuse it too), then run the update again",
        ) from None
    return {key: value for key, (value, _where) in found.items()}


def with_key(text: bytes, key: str, value: str, comment: str) -> bytes:
    """``text`` with ``# comment`` and ``KEY=value`` appended; the bytes before stay as they are."""
    if not _KEY.match(key):
        raise MigrationError(
            f"a migration tried to add the config key {key!r}",
            "config keys are 1-64 capital letters, digits and _, starting with a letter",
        )
    if any(c in value for c in _FORBIDDEN) or value != value.strip():
        raise MigrationError(
            f"a migration tried to add {key} with the value {value!r}",
            "a value is one line without leading or trailing spaces",
        )
    if any(c in comment for c in ("\r", "\0")):
        raise MigrationError(
            f"the comment for {key} has a carriage return or NUL", "use plain lines"
        )
    block = b""
    if text and not text.endswith(b"\n"):
        block += b"\n"  # end the last line, so the new one does not join it
    if text and not text.endswith(b"\n\n"):
        block += b"\n"
    for line in comment.strip().splitlines():
        block += f"# {line}".rstrip().encode() + b"\n"
    block += f"{key}={value}\n".encode()
    new = text + block
    if read_values(new, "the migrated config").get(key) != value:
        raise MigrationError(
            f"{key}={value} would not read back as {value!r} from the config",
            "choose a value without surrounding quotes",
        )
    return new


class ConfigFile:
    """The config of one server, in memory; a migration reads and adds keys here."""

    def __init__(self, path: Path, text: bytes) -> None:
        self.path = path
        self.original = text
        self.text = text

    @classmethod
    def load(cls, path: Path) -> ConfigFile:
        try:
            text = path.read_bytes()
        except OSError as exc:
            raise MigrationError(
                f"cannot read the config {path}: {exc.strerror}",
                "the migrations need the server config; run as root on an installed server",
            ) from None
        read_values(text, str(path))  # refuse a file scaleboxd would refuse, before any change
        return cls(path, text)

    def values(self) -> dict[str, str]:
        return read_values(self.text, str(self.path))

    def get(self, key: str) -> str | None:
        """The value the file sets, or None when it does not set the key (its default applies)."""
        return self.values().get(key)

    def has(self, key: str) -> bool:
        return key in self.values()

    def add(self, key: str, value: str, comment: str) -> bool:
        """Set ``key`` to ``value`` with a comment, unless the file sets it already.

        Returns whether the key was added. Idempotent: run twice, it adds once.
        """
        if self.has(key):
            return False
        self.text = with_key(self.text, key, value, comment)
        return True

    @property
    def changed(self) -> bool:
        return self.text != self.original

    def save(self) -> None:
        """Replace the file atomically, keeping its mode and owner; a no-op when unchanged."""
        if not self.changed:
            return
        try:
            st = self.path.stat()
            atomic_write(self.path, self.text, mode=st.st_mode & 0o7777)
            os.chown(self.path, st.st_uid, st.st_gid)
        except OSError as exc:
            raise MigrationError(
                f"cannot write the config {self.path}: {exc.strerror}",
                "check the disk and permissions; the update is rolled back",
            ) from exc  # its errno tells the updater a full disk from a bad release
        self.original = self.text
