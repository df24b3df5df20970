"""A full disk under a download or an extraction (before any transaction) is recorded
in the history, as a full disk at any other step before the transaction is."""

from __future__ import annotations

import errno
from pathlib import Path
from types import SimpleNamespace

import pytest

from scalebox.errors import ScaleboxError
from scalebox.release.errors import ReleaseError
from scalebox.update import history, main
from scalebox.update.errors import UpdateError
from scalebox.update.fetch import FetchError
from scalebox.update.paths import Paths


def _full(path: str) -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", path)


def _raised(paths: Paths, error: ScaleboxError) -> ScaleboxError:
    ctx = SimpleNamespace(paths=paths)  # all the recorder reads of the context
    with (
        pytest.raises(type(error)) as caught,
        main._refusals_recorded(ctx, "update", "1.2.3", record=True),  # type: ignore[arg-type]
    ):
        raise error
    return caught.value


def _errors() -> list[ScaleboxError]:
    download = FetchError("cannot write the download to /x.tar.gz: No space left on device")
    download.__cause__ = _full("/x.tar.gz")
    extracted = ReleaseError("cannot write /w/top: No space left on device", "free disk space")
    extracted.__cause__ = _full("/w/top")
    opened = UpdateError(f"{extracted.what}; nothing was changed", extracted.hint)
    opened.__cause__ = extracted  # as main.py's _open_release wraps it
    return [download, opened]


def test_a_full_disk_under_a_download_or_an_extraction_is_recorded(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    for error in _errors():
        assert _raised(paths, error) is error  # told as it was, not rewrapped
    entries = history.read(paths.history)
    assert [e.result for e in entries] == ["refused", "refused"]
    assert [e.to_version for e in entries] == ["1.2.3", "1.2.3"]
    reasons = [str(e.reason) for e in entries]
    assert reasons[0].startswith("cannot write the download")
    assert all(r.count("nothing was changed") == 1 for r in reasons)


def test_a_refusal_that_is_not_the_disk_is_not_recorded_here(tmp_path: Path) -> None:
    """A bad signature or a network error: told, recorded by no one (as before)."""
    paths = Paths(tmp_path)
    _raised(paths, ReleaseError("bad signature", "get the release again"))
    _raised(paths, FetchError("could not download http://x: connection refused"))
    assert history.read(paths.history) == []
