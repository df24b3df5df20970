"""Every server path the updater reads or writes, in one place.

``Paths(root=tmp_path)`` moves the whole layout under a directory, so the
file-level steps run in tests exactly as they run on a server.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path

from scalebox.update.errors import UpdateError


@dataclass(frozen=True)
class Paths:
    root: Path = Path("/")

    def _at(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")

    @property
    def opt(self) -> Path:
        return self._at("/opt/scalebox")

    @property
    def releases(self) -> Path:
        return self.opt / "releases"

    @property
    def current(self) -> Path:
        """The symlink ``current -> releases/<version>`` that selects the running release."""
        return self.opt / "current"

    @property
    def systemd_dir(self) -> Path:
        return self._at("/etc/systemd/system")

    @property
    def config(self) -> Path:
        return self._at("/etc/scaleboxd/config")

    @property
    def version_file(self) -> Path:
        return self._at("/etc/scaleboxd/version")

    @property
    def keys_dir(self) -> Path:
        return self._at("/etc/scalebox/keys")

    @property
    def state_dir(self) -> Path:
        return self._at("/var/lib/scalebox-update")

    @property
    def journal(self) -> Path:
        return self.state_dir / "journal.json"

    @property
    def history(self) -> Path:
        return self.state_dir / "history.jsonl"

    @property
    def lock(self) -> Path:
        return self.state_dir / "lock"

    @property
    def downloads(self) -> Path:
        return self.state_dir / "downloads"

    @property
    def work(self) -> Path:
        """Scratch space for extracted tarballs; emptied after each run."""
        return self.state_dir / "work"

    @property
    def backups(self) -> Path:
        return self.state_dir / "backups"

    def release_dir(self, name: str) -> Path:
        return self.releases / name

    def backup_dir(self, transaction_id: str) -> Path:
        return self.backups / transaction_id


def private_dir(path: Path) -> Path:
    """Make ``path`` a root-only (0700) directory whatever the umask; refuse a link or a file.

    The updater's working areas hold untrusted downloads and extracted
    releases: no other user may read them while it works.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise UpdateError(
            f"{path} is not a directory (a link or a file is in its place)",
            f"remove {path}; scalebox-update makes it again, root-only",
        )
    if st.st_mode & 0o777 != 0o700:
        path.chmod(0o700)
    return path
