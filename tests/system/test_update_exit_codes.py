"""Every exit code of scalebox-update, driven on one real server; the docs are the oracle.

The table in docs/operations.md ("### scalebox-update") is parsed, and each
of its rows is produced here by a real run: its code and its ``--json``
result must be the ones the row names, and every row must be produced.
"""

from __future__ import annotations

from tools.releases import CRASH, A, B

from tests.unit.test_update_exit_codes import docs_table

from .test_update_faults import RUN, finish, start_stopped
from .update_helpers import CORRUPT, MNT, Server, tarball


def test_each_documented_exit_code_is_what_that_outcome_exits_with(server: Server) -> None:
    table = docs_table("scalebox-update")
    seen: dict[int, str] = {}

    def expect(code: int, result: dict[str, object], err: str, wanted: int) -> None:
        assert code == wanted, err
        assert result["result"] == table[wanted][0], (result, err)
        seen[code] = str(result["result"])

    url = f"SCALEBOX_RELEASE_URL={tarball(B)}"
    expect(*server.update("--check", env=url), 10)
    expect(*server.update("--no-such-option"), 2)
    expect(*server.update(env=f"SCALEBOX_RELEASE_URL={MNT}/{CORRUPT}"), 1)

    # Another updater holds the lock (flock(1) takes the same lock as the updater).
    server.sh(
        "systemd-run --quiet --unit=hold-lock flock /var/lib/scalebox-update/lock sleep 600"
        " && while flock -n /var/lib/scalebox-update/lock true; do sleep 0.1; done"
    )
    expect(*server.update(env=url), 5)
    server.sh("systemctl stop hold-lock")

    expect(*server.update(env=f"SCALEBOX_RELEASE_URL={tarball(CRASH)}"), 3)
    server.assert_intact(A)
    expect(*server.update(env=url), 0)
    server.assert_intact(B)

    # The rollback itself fails: once CRASH failed, B's daemon is stopped and cannot
    # start any more. (Left running, it would keep serving through the handover and
    # the rollback would rightly not restart it.)
    pid = start_stopped(server, "rollback", CRASH)
    server.sh(
        f"systemctl stop scaleboxd && chmod a-x /opt/scalebox/releases/{B}/venv/bin/scaleboxd"
        f" && kill -CONT {pid}"
    )
    code, result, err = finish(server)
    expect(code, result, err, 4)
    assert "scalebox-update recover" in str(result["hint"])
    server.sh(f"chmod a+x /opt/scalebox/releases/{B}/venv/bin/scaleboxd; rm -rf {RUN}")
    code, recovered, err = server.update("recover")
    assert code == 0, err
    assert (
        recovered["message"]
        == f"recovered: rolled back the interrupted update to {CRASH}; {B} is healthy"
    )
    server.assert_intact(B)

    assert sorted(seen) == sorted(table)
