"""RELEASE.json parsing: names are plain and distinct, malformed input is a refusal (pure)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from scalebox.release import manifest
from scalebox.release.errors import ReleaseError

SHA = "0" * 64


def good() -> dict[str, Any]:
    return {
        "format": 1,
        "name": "scalebox",
        "version": "1.2.3",
        "arch": "x86_64",
        "python": ["3.11"],
        "entry_points": ["scalebox", "scaleboxd"],
        "units": ["scaleboxd.service", "scalebox-vm@.service"],
        "files": {
            "keys/release.pub": SHA,
            "scripts/install.sh": SHA,
            "units/scaleboxd.service": SHA,
            "units/scalebox-vm@.service": SHA,
            "wheels/scalebox-1.2.3-py3-none-any.whl": SHA,
        },
    }


def refused(data: bytes | dict[str, Any], words: str) -> ReleaseError:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    with pytest.raises(ReleaseError) as info:
        manifest.parse(raw)
    assert words in info.value.what
    assert info.value.hint
    assert len(info.value.what) < 400  # never the whole hostile input
    return info.value


def test_a_good_manifest_parses() -> None:
    parsed = manifest.parse(json.dumps(good()).encode())
    assert parsed.units == ("scaleboxd.service", "scalebox-vm@.service")


@pytest.mark.parametrize(
    "entry_point",
    ["../../../usr/bin/evil", "bin/scalebox", "/usr/local/bin/x", "..", ".hidden", "a b", ""],
)
def test_an_entry_point_must_be_a_plain_name(entry_point: str) -> None:
    data = good()
    data["entry_points"] = ["scalebox", entry_point]
    refused(data, "entry point" if entry_point else "must be a list of names")


@pytest.mark.parametrize(
    "unit",
    [
        "../x.service",
        "units/x.service",
        "scaleboxd",
        "x.conf",
        "x.service/",
        ".service",
        "a\nb.service",
    ],
)
def test_a_unit_must_be_a_plain_unit_file_name(unit: str) -> None:
    data = good()
    data["units"] = [unit]
    refused(data, "unit")


@pytest.mark.parametrize(
    ("key", "names", "words"),
    [
        ("units", ["scaleboxd.service", "ScaleboxD.service"], "differ only in case"),
        ("entry_points", ["scalebox", "SCALEBOX"], "differ only in case"),
        ("entry_points", ["scalebox", "scalebox"], "listed twice"),
        # U+FB01 (the "fi" ligature) is "fi" under NFKC; outside the alphabet anyway.
        ("entry_points", ["fix", "\ufb01x"], "not a plain program name"),
    ],
    ids=["units-case", "entry-points-case", "entry-points-twice", "nfkc-ligature"],
)
def test_names_that_collide_are_refused(key: str, names: list[str], words: str) -> None:
    data = good()
    data[key] = names
    refused(data, words)


def test_file_paths_that_differ_only_in_case_are_refused() -> None:
    data = good()
    data["files"]["units/ScaleboxD.service"] = SHA
    refused(data, "differ only in case or Unicode form")


def test_a_file_named_like_the_manifest_in_another_case_is_refused() -> None:
    data = good()
    data["files"]["release.json"] = SHA
    refused(data, "differ only in case or Unicode form")


def test_fold_joins_case_and_unicode_forms() -> None:
    assert manifest.fold("Caf\u00e9") == manifest.fold("cafe\u0301")  # NFC vs NFD
    assert manifest.fold("\ufb01") == manifest.fold("FI")
    assert manifest.fold("a") != manifest.fold("b")


@pytest.mark.parametrize(
    "path",
    [
        "wheels/../../etc/passwd",
        "/etc/passwd",
        "wheels//x",
        "wheels/\u00e9.whl",
        "a\\b",
        "wheels/.x",
    ],
)
def test_a_file_path_must_be_plain_names(path: str) -> None:
    data = good()
    data["files"][path] = SHA
    refused(data, "unsafe path")


def test_a_path_more_than_16_levels_deep_is_refused() -> None:
    """1 MiB of 1000-character paths 500 levels deep made extract hold every parent of
    every path: 320 MB. 16 levels is far more than a release needs (wheels/x.whl)."""
    data = good()
    data["files"]["/".join(["a"] * 16)] = SHA
    manifest.parse(json.dumps(data).encode())
    data["files"]["/".join(["b"] * 17)] = SHA
    refused(data, "more than 16 levels deep")


def test_a_file_under_a_file_is_refused() -> None:
    data = good()
    data["files"]["keys/release.pub/x"] = SHA
    refused(data, "which is a file")


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"format": ' + b"1" * 5000 + b"}", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (
            b'{"format": 1, "name": "scalebox", "arch": "x", "version": "' + b"9" * 5000 + b'"}',
            "not allowed",
        ),
        (json.dumps({"format": "x" * 100_000}).encode(), "has format"),
    ],
    ids=["deeply-nested", "huge-int", "not-utf8", "huge-version", "huge-format"],
)
def test_malformed_json_is_a_refusal_not_a_traceback(raw: bytes, words: str) -> None:
    refused(raw, words)


def test_a_version_that_is_a_safe_name_but_not_pep_440_is_refused() -> None:
    data = good()
    data["version"] = "1.0-x_y"
    refused(data, "is not a version")


@pytest.mark.parametrize(
    ("where", "words"),
    [("top", "the key 'units' twice"), ("files", "the key 'scripts/install.sh' twice")],
)
def test_a_key_given_twice_is_refused(where: str, words: str) -> None:
    """json.loads keeps the last of two equal keys, other readers (and a reviewer's eye)
    the first: the signed bytes would mean two things."""
    text = json.dumps(good())
    if where == "top":
        text = text.replace('"units": [', '"units": ["evil.service"], "units": [', 1)
    else:
        text = text.replace(
            '"scripts/install.sh": ', f'"scripts/install.sh": "{SHA}", "scripts/install.sh": ', 1
        )
    refused(text.encode(), words)
