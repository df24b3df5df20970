"""scalebox-update --stage on a real systemd server: build B next to A, switch later.

A pre-stage downloads, verifies and builds releases/B and checks the live
config with it, and touches nothing live: A keeps serving with the same PID.
The next scalebox-update re-checks the staged B (RELEASE.json bytes against
the newly verified release, every staged file against staging's record) and
only switches. A pre-stage killed with SIGKILL leaves a directory without
.complete, which the next run removes and rebuilds instead of trusting.
"""

from __future__ import annotations

import pytest
from tools.releases import A, B

from .update_helpers import Server, tarball

URL_B = f"SCALEBOX_RELEASE_URL={tarball(B)}"


def _stage_seconds(result: dict[str, object]) -> float:
    times = result["step_times"]
    assert isinstance(times, dict), result
    return float(times["backup"]) - float(times["stage"])


def test_stage_builds_b_beside_a_then_the_update_only_switches(server: Server) -> None:
    before = server.snapshot()
    code, result, err = server.update("--dry-run", "--stage", env=URL_B)
    assert (code, result["result"]) == (0, "dry run"), err
    assert f"would stage {A} -> {B}" in str(result["message"])
    server.assert_intact(A, unchanged=before)

    code, result, err = server.update("--stage", env=URL_B)
    assert (code, result["result"]) == (0, "staged"), err
    assert (result["installed"], result["target"]) == (A, B)
    # It came from SCALEBOX_RELEASE_URL: the command it names finds it there again.
    assert "`scalebox-update` with the same SCALEBOX_RELEASE_URL switches to it" in str(
        result["message"]
    )
    staged = f"/opt/scalebox/releases/{B}"
    assert (
        server.sh(f"test -f {staged}/.complete && test -x {staged}/venv/bin/scaleboxd").returncode
        == 0
    )
    # Nothing live changed: A serves from the same process, current still names A.
    assert server.health() == A
    assert server.main_pid("scaleboxd.service") == before.daemon_pid
    assert server.sh("readlink /opt/scalebox/current").stdout.strip() == before.current
    assert server.sh("cat /etc/scaleboxd/version").stdout.strip() == A
    complete_inode = server.sh(f"stat -c %i {staged}/.complete").stdout

    # Staging again finds it complete and re-checked: nothing rebuilt.
    code, result, err = server.update("--stage", env=URL_B)
    assert (code, result["result"]) == (0, "staged"), err
    assert "already built and re-checked" in str(result["message"])

    code, result, err = server.update(env=URL_B)
    assert (code, result["result"]) == (0, "updated"), err
    assert f"releases/{B} is already built from this release; reusing it" in err
    assert server.sh(f"stat -c %i {staged}/.complete").stdout == complete_inode
    print(f"stage step with a pre-staged release: {_stage_seconds(result):.2f}s")
    server.assert_intact(B)


def test_a_tampered_prestaged_release_is_rebuilt_not_trusted(server: Server) -> None:
    code, result, err = server.update("--stage", env=URL_B)
    assert (code, result["result"]) == (0, "staged"), err
    site = f"/opt/scalebox/releases/{B}/venv/lib/python3*/site-packages"
    # A mode is part of what was staged: a daemon script no longer executable (it would
    # fail every update's config check) and a world-writable package are rebuilt too.
    server.sh(f"chmod 644 /opt/scalebox/releases/{B}/venv/bin/scaleboxd")
    server.sh(f"chmod 777 {site}/scalebox/cli")
    code, result, err = server.update("--stage", env=URL_B)
    assert (code, result["result"]) == (0, "staged"), err
    assert f"releases/{B} is not exactly what this release builds; rebuilding it" in err
    modes = server.sh(
        f"stat -c %a /opt/scalebox/releases/{B}/venv/bin/scaleboxd {site}/scalebox/cli"
    ).stdout.split()
    assert modes == ["755", "755"]
    server.sh(f"echo 'raise SystemExit(3)' >> {site}/scalebox/daemon/main.py")
    code, result, err = server.update(env=URL_B)
    assert (code, result["result"]) == (0, "updated"), err
    assert f"releases/{B} is not exactly what this release builds; rebuilding it" in err
    assert "SystemExit(3)" not in server.sh(f"cat {site}/scalebox/daemon/main.py").stdout
    # B shared that file with A by hard link, so the edit in place changed A too: said.
    assert f"shared with the running release releases/{A}, which is changed too" in err, err
    server.assert_intact(B)


# Inside the machine: start a pre-stage, SIGKILL it once the venv is being filled,
# then wait for the installer it had started to end too (PR_SET_PDEATHSIG: at once).
# The pattern's brackets keep pgrep from matching this script's own shell, whose
# command line holds the pattern: it matched that before, and waited out its 60 s.
# Gone means gone for 2 s in a row: an install forked just before the kill still
# carries the updater's command line, and only takes the installer's (then sees its
# parent gone, and kills itself) a moment later; a single look missed it once (CI).
KILL_DURING_STAGE = f"""
{URL_B} scalebox-update --stage </dev/null >/tmp/stage.log 2>&1 &
pid=$!
for _ in $(seq 1 3000); do
  test -d /opt/scalebox/releases/{B}/venv/lib && break
  sleep 0.01
done
if ! test -d /opt/scalebox/releases/{B}/venv/lib; then
  echo "staging never began"; cat /tmp/stage.log; exit 1
fi
kill -9 $pid
wait $pid
echo "exit $?"
gone=0
for _ in $(seq 1 600); do
  if pgrep -f '[w]heel_install[.]py' >/dev/null; then gone=0; else gone=$((gone + 1)); fi
  test "$gone" -ge 20 && break
  sleep 0.1
done
if pgrep -f '[w]heel_install[.]py' >/dev/null; then echo "the install outlived its updater"; fi
test -e /opt/scalebox/releases/{B}/.complete && echo "complete after the kill"
true
"""


def test_a_prestage_killed_midway_leaves_nothing_a_later_update_trusts(server: Server) -> None:
    before = server.snapshot()
    killed = server.sh(KILL_DURING_STAGE, check=False)
    assert killed.returncode == 0, killed.stdout + killed.stderr
    assert "exit 137" in killed.stdout, killed.stdout
    assert "complete after the kill" not in killed.stdout
    assert "the install outlived its updater" not in killed.stdout
    assert server.health() == A
    assert server.main_pid("scaleboxd.service") == before.daemon_pid

    code, result, err = server.update(env=URL_B)
    assert (code, result["result"]) == (0, "updated"), err
    assert f"removing unfinished release directory releases/{B}" in err
    assert "reusing it" not in err
    print(f"stage step building B afresh: {_stage_seconds(result):.2f}s")
    server.assert_intact(B)


@pytest.mark.parametrize("mode", ["--check", "--rollback"])
def test_stage_with_check_or_rollback_is_a_usage_error(server: Server, mode: str) -> None:
    before = server.snapshot()
    code, result, err = server.update("--stage", mode, env=URL_B)
    assert code != 0
    assert "--stage cannot be combined" in err + str(result.get("message", ""))
    server.assert_intact(A, unchanged=before)
