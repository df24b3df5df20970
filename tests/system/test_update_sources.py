"""A->B from where releases really come from: an https URL and a GitHub-style releases API.

Both are served over real TLS by tests/system/fake_github.py INSIDE the
machine, on 127.0.0.1 (nothing leaves the machine). The certificate is signed
by a throwaway CA that only the updater's environment trusts (SSL_CERT_FILE,
which the updater's httpx client honours), so these runs prove that https
verification works, not that it is switched off.
"""

from __future__ import annotations

import json

from tools.releases import ARCH, A, B

from .update_helpers import (
    API,
    API_LOG,
    ASSETS,
    ASSETS_LOG,
    TRUST_TEST_CA,
    Server,
    requests_seen,
    start_fake_github,
)

TOKEN = "ghp_scaleboxTestToken0123456789"
REPO = "scalebox-test/scalebox"


def test_a_to_b_from_an_https_url_then_rollback_to_a(server: Server) -> None:
    start_fake_github(server)
    url = f"{ASSETS}/files/scalebox-{B}-{ARCH}.tar.gz"
    code, result, err = server.update(env=f"{TRUST_TEST_CA} SCALEBOX_RELEASE_URL={url}")
    print(err)
    assert code == 0, err
    assert (result["result"], result["installed"], result["target"]) == ("updated", A, B)
    assert f"release from SCALEBOX_RELEASE_URL: {url}" in err
    assert [r["path"] for r in requests_seen(server, ASSETS_LOG)] == [
        f"/files/scalebox-{B}-{ARCH}.tar.gz"
    ]
    server.assert_intact(B)

    code, result, err = server.update("--rollback")
    assert code == 0, err
    assert (result["result"], result["installed"], result["target"]) == ("updated", B, A)
    server.assert_intact(A)


def test_a_to_b_from_a_github_style_releases_api_with_a_token(server: Server) -> None:
    start_fake_github(server)
    env = (
        f"{TRUST_TEST_CA} SCALEBOX_GITHUB_API={API}/ok SCALEBOX_UPDATE_REPO={REPO} "
        f"GITHUB_TOKEN={TOKEN}"
    )
    code, result, err = server.update("--check", env=env)
    assert (code, result["result"], result["target"]) == (10, "update available", B), err

    code, result, err = server.update(env=env)
    print(err)
    assert code == 0, err
    assert (result["result"], result["installed"], result["target"]) == ("updated", A, B)
    assert f"release from latest GitHub release v{B} of {REPO}" in err
    server.assert_intact(B)

    api = requests_seen(server, API_LOG)
    assert [r["path"] for r in api] == [f"/api/ok/repos/{REPO}/releases/latest"] * 2
    assert {r["authorization"] for r in api} == {f"Bearer {TOKEN}"}
    # The asset host is another origin (another port): it never sees the token.
    assets = requests_seen(server, ASSETS_LOG)
    assert [r["path"] for r in assets] == [f"/files/scalebox-{B}-{ARCH}.tar.gz"]
    assert [r["authorization"] for r in assets] == [None]
    history = [
        json.loads(h) for h in server.sh("scalebox-update history --json").stdout.splitlines()
    ]
    assert [(h["from"], h["to"], h["result"]) for h in history] == [(A, B, "updated")]
