"""Releases and sources that scalebox-update must refuse before changing anything.

Every case runs on one shared machine with A installed, which is itself the
proof: each refusal must leave everything exactly as it was (exit 1, A
healthy, the same scaleboxd main PID, no new release directory, unit files
and their enable links byte-identical, no journal, config, DATA_DIR and the
VM untouched), or the cases after it fail too.

The bad tarballs are crafted from the real signed B (update_helpers), each
wrong in one way only: those with an unsafe member are re-signed with the
trusted key, so the member is the only fault. Servers run inside the machine
on 127.0.0.1 over https (fake_github.py); the unreachable URL is a loopback
port nobody listens on.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from tools.releases import ARCH, A, B, tarball_name

from .update_helpers import (
    ABSOLUTE,
    API,
    ASSETS,
    BAD_SIGNATURE,
    CORRUPT,
    DOTDOT,
    ESCAPED,
    MNT,
    OTHER_ARCH,
    SYMLINK,
    TRUST_TEST_CA,
    UNTRUSTED_KEY,
    WRONG_ARCH,
    BootMachine,
    Server,
    install_a,
    start_fake_github,
    tarball,
)

REPO = "scalebox-test/scalebox"
DOWNLOADS = "/var/lib/scalebox-update/downloads"


@pytest.fixture(scope="module")
def shared(module_boot_machine: BootMachine, releases: object) -> Server:
    s = install_a(module_boot_machine(releases))
    start_fake_github(s)
    return s


@dataclass(frozen=True)
class Case:
    env: str
    what: tuple[str, ...]  # words the message must contain
    hint: tuple[str, ...]  # words of what to do next


def _url(path: str) -> str:
    return f"SCALEBOX_RELEASE_URL={path}"


CASES = {
    "corrupt-tarball": Case(
        _url(f"{MNT}/{CORRUPT}"),
        ("archive is damaged", "refusing to extract"),
        ("get the release again",),
    ),
    "bad-signature": Case(
        _url(f"{MNT}/{BAD_SIGNATURE}"),
        ("RELEASE.json is not signed by a trusted key",),
        ("get it from a trusted source",),
    ),
    "untrusted-key": Case(
        _url(f"{MNT}/{UNTRUSTED_KEY}"),
        ("RELEASE.json is not signed by a trusted key", "/etc/scalebox/keys/release.pub"),
        ("add its public key to /etc/scalebox/keys/ if you trust it",),
    ),
    "dotdot-member": Case(
        _url(f"{MNT}/{DOTDOT}"),
        ("points outside the release ('..')", "refusing to extract"),
        ("get the release again from a trusted source",),
    ),
    "absolute-member": Case(
        _url(f"{MNT}/{ABSOLUTE}"),
        (f"member '{ESCAPED[1]}' has an absolute path", "refusing to extract"),
        ("get the release again from a trusted source",),
    ),
    "symlink-out-of-tree": Case(
        _url(f"{MNT}/{SYMLINK}"),
        ("is a symbolic link (to '/etc')", "refusing to extract"),
        ("get the release again from a trusted source",),
    ),
    "wrong-arch": Case(
        _url(f"{MNT}/{WRONG_ARCH}"),
        (f"the release is for {OTHER_ARCH}, this machine is {ARCH}",),
        (f"use the release built for {ARCH}: {tarball_name(B)}",),
    ),
    "unreachable-url": Case(
        # Port 9 on the machine's loopback: nobody listens there.
        _url(f"https://127.0.0.1:9/{tarball_name(B)}"),
        ("could not download", "cannot connect"),
        ("check the network and the URL",),
    ),
    "untrusted-tls-certificate": Case(
        # The same server, without the test CA: https verification is on.
        _url(f"{ASSETS}/files/{tarball_name(B)}"),
        ("TLS certificate of 127.0.0.1", "not trusted"),
        ("SSL_CERT_FILE",),
    ),
    "plain-http-url": Case(
        _url(f"http://127.0.0.1:9/{tarball_name(B)}"),
        ("refusing plain http",),
        ("use an https URL", "--allow-http"),
    ),
    "api-403": Case(
        f"{TRUST_TEST_CA} SCALEBOX_GITHUB_API={API}/403 SCALEBOX_UPDATE_REPO={REPO}",
        ("the releases API refused access", "(403)"),
        (f"set GITHUB_TOKEN to a token that may read {REPO}",),
    ),
    "api-404": Case(
        f"{TRUST_TEST_CA} SCALEBOX_GITHUB_API={API}/404 SCALEBOX_UPDATE_REPO={REPO}",
        (f"no repository {REPO} at {API}/404 (404)",),
        ("check SCALEBOX_UPDATE_REPO", "SCALEBOX_GITHUB_API"),
    ),
    "api-garbage": Case(
        f"{TRUST_TEST_CA} SCALEBOX_GITHUB_API={API}/garbage SCALEBOX_UPDATE_REPO={REPO}",
        ("answered with something that is not a GitHub release", "not JSON"),
        ("check SCALEBOX_GITHUB_API points at a GitHub API", "SCALEBOX_RELEASE_URL"),
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_refused_before_any_change(shared: Server, case: Case) -> None:
    before = shared.snapshot()
    code, result, err = shared.update(env=case.env)
    print(f"{result.get('message')}\n  hint: {result.get('hint')}")
    assert code == 1, err
    assert result["result"] == "refused"
    for words in case.what:
        assert words in str(result["message"])
    for words in case.hint:
        assert words in str(result["hint"])
    shared.assert_intact(A, unchanged=before)
    escaped = shared.sh(f"ls -d {' '.join(ESCAPED)} 2>/dev/null", check=False).stdout
    assert escaped == ""


def test_truncated_download_is_refused_and_kept_to_resume(shared: Server) -> None:
    """The server sends half the file and closes, every time: no retry completes it."""
    before = shared.snapshot()
    url = f"{ASSETS}/truncated/{tarball_name(B)}"
    code, result, err = shared.update(env=f"{TRUST_TEST_CA} {_url(url)}")
    assert (code, result["result"]) == (1, "refused"), err
    size = int(shared.sh(f"stat -c %s {MNT}/{tarball_name(B)}").stdout)
    part = f"{DOWNLOADS}/{tarball_name(B)}.part"
    assert int(shared.sh(f"stat -c %s {part}").stdout) == size // 2
    print(f"{result.get('message')}\n  hint: {result.get('hint')}")
    assert f"stopped at {size // 2} of {size} bytes" in str(result["message"])
    # The hint promises a resume: the partial file is kept for it.
    assert "run scalebox-update again to resume" in str(result["hint"])
    shared.assert_intact(A, unchanged=before)
    # Only this test's leftover: later cases download B's name afresh.
    shared.sh(f"rm -f {part} {part}.validator")


def test_install_sh_again_changes_nothing_and_keeps_recovery_enabled(shared: Server) -> None:
    before = shared.snapshot()
    done = shared.sh(f"bash {MNT}/install.sh --backend process {tarball(A)}")
    assert f"scalebox {A} is already installed and running; nothing changed" in done.stdout
    enabled = shared.sh("systemctl is-enabled scalebox-update-recover.service")
    assert enabled.stdout.strip() == "enabled"
    shared.assert_intact(A, unchanged=before)
