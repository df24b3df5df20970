"""The updater's pure decisions: version choice, recovery per journal step, pruning."""

from __future__ import annotations

from dataclasses import replace

import pytest

from scalebox.update import plan, systemd
from scalebox.update.errors import UpdateError
from scalebox.update.history import REFUSED, ROLLED_BACK, UPDATED, Entry
from scalebox.update.journal import STEPS
from scalebox.update.plan import Decision, Recovery, ReleaseDir


def test_newer_version_is_an_update() -> None:
    assert plan.decide("0.1.0", "0.2.0", force=False, allow_downgrade=False) is Decision.UPDATE


def test_same_version_is_up_to_date_unless_forced() -> None:
    assert plan.decide("0.2.0", "0.2.0", force=False, allow_downgrade=False) is (
        Decision.UP_TO_DATE
    )
    assert plan.decide("0.2.0", "0.2.0", force=True, allow_downgrade=False) is Decision.REINSTALL


def test_same_version_spelled_differently_is_up_to_date() -> None:
    assert plan.decide("1.0", "1.0.0", force=False, allow_downgrade=False) is Decision.UP_TO_DATE


def test_older_version_is_refused_with_the_flag_named() -> None:
    with pytest.raises(UpdateError, match=r"older than the installed 0\.2\.0") as caught:
        plan.decide("0.2.0", "0.1.0", force=False, allow_downgrade=False)
    assert caught.value.hint is not None
    assert "--allow-downgrade" in caught.value.hint


def test_older_version_with_allow_downgrade_is_a_downgrade() -> None:
    assert plan.decide("0.2.0", "0.1.0", force=False, allow_downgrade=True) is Decision.DOWNGRADE


def test_prerelease_sorts_before_its_release() -> None:
    assert plan.decide("1.0.0rc1", "1.0.0", force=False, allow_downgrade=False) is Decision.UPDATE


# Written by hand from the design, not derived from plan.recovery_action:
# nothing live moved before the switch (a half-migrated config is put back from
# the backup); the switch may be half done until verify passed; after that only
# bookkeeping is left.
RECOVERY_BY_HAND = {
    "stage": Recovery.DISCARD,
    "backup": Recovery.DISCARD,
    "migrate": Recovery.DISCARD,
    "switch": Recovery.ROLL_BACK,
    "handover": Recovery.ROLL_BACK,
    "verify": Recovery.ROLL_BACK,
    "commit": Recovery.COMMIT,
    "rollback": Recovery.ROLL_BACK,
}


@pytest.mark.parametrize(("step", "action"), RECOVERY_BY_HAND.items())
def test_every_journal_step_has_its_recovery(step: str, action: Recovery) -> None:
    assert plan.recovery_action(step) is action


def test_the_hand_written_table_covers_every_step_the_journal_can_hold() -> None:
    # A new journal step fails here until someone writes down its recovery.
    assert set(RECOVERY_BY_HAND) == set(STEPS)


def test_unknown_step_is_an_error_not_a_guess() -> None:
    with pytest.raises(ValueError, match="unknown journal step"):
        plan.recovery_action("migrate-ish")


def _dirs(*names: str, incomplete: tuple[str, ...] = ()) -> list[ReleaseDir]:
    return [ReleaseDir(n, n, n not in incomplete) for n in names]


def test_prune_keeps_the_three_newest_with_current_and_previous() -> None:
    releases = _dirs("0.1.0", "0.2.0", "0.3.0", "0.4.0", "0.5.0")
    doomed = plan.to_prune(releases, current="0.5.0", previous="0.4.0", failed=set())
    assert doomed == ["0.1.0", "0.2.0"]


def test_prune_never_removes_current_or_previous_even_when_old() -> None:
    # After a downgrade to 0.1.0 from 0.5.0: both must stay.
    releases = _dirs("0.1.0", "0.2.0", "0.3.0", "0.4.0", "0.5.0")
    doomed = plan.to_prune(releases, current="0.1.0", previous="0.5.0", failed=set())
    assert "0.1.0" not in doomed
    assert "0.5.0" not in doomed
    assert doomed == ["0.2.0", "0.3.0"]


def test_failed_releases_do_not_take_a_place_and_are_pruned() -> None:
    releases = _dirs("0.1.0", "0.2.0", "0.3.0", "0.4.0")
    doomed = plan.to_prune(releases, current="0.3.0", previous="0.2.0", failed={"0.4.0"})
    assert doomed == ["0.4.0"]  # 0.1.0 keeps the third place that 0.4.0 may not take


def test_unfinished_directories_are_pruned() -> None:
    releases = _dirs("0.1.0", "0.2.0", "0.3.0", incomplete=("0.3.0",))
    assert plan.to_prune(releases, current="0.2.0", previous="0.1.0", failed=set()) == ["0.3.0"]


def test_unparsable_directory_sorts_as_oldest() -> None:
    releases = [*_dirs("0.2.0", "0.3.0", "0.4.0"), ReleaseDir("junk", "not a version", True)]
    assert plan.to_prune(releases, current="0.4.0", previous="0.3.0", failed=set()) == ["junk"]


def _entry(frm: str, to: str, result: str, action: str = "update") -> Entry:
    return Entry("2026-01-01T00:00:00Z", f"id-{frm}-{to}-{result}", action, frm, to, result)


def test_failed_versions_are_those_last_rolled_back() -> None:
    entries = [
        _entry("0.1.0", "0.2.0", ROLLED_BACK),
        _entry("0.1.0", "0.3.0", ROLLED_BACK),
        _entry("0.1.0", "0.3.0", UPDATED),  # fixed on a later try
        _entry("0.3.0", "0.4.0", REFUSED),
    ]
    assert plan.failed_versions(entries) == {"0.2.0"}


def test_an_interrupted_operator_rollback_does_not_mark_its_target_failed() -> None:
    """A power cut in a --rollback's verify: recovery brings 0.3.0 back and records the
    rollback to 0.2.0 as rolled back. 0.2.0 ran before and never failed: it keeps its
    place among the releases kept."""
    entries = [
        _entry("0.1.0", "0.2.0", UPDATED),
        _entry("0.2.0", "0.3.0", UPDATED),
        _entry("0.3.0", "0.2.0", ROLLED_BACK, action="rollback"),
    ]
    assert plan.failed_versions(entries) == set()
    releases = _dirs("0.1.0", "0.2.0", "0.3.0", "0.4.0")
    failed = plan.failed_versions(entries)
    assert plan.to_prune(releases, current="0.4.0", previous="0.3.0", failed=failed) == ["0.1.0"]


def test_a_rollback_the_release_did_not_cause_does_not_mark_it_failed() -> None:
    """A SIGTERM or a power cut after the switch rolls back before 0.3.0 was judged
    (release_failed false): it stays as good or as bad as it was before."""
    stopped = replace(_entry("0.2.0", "0.3.0", ROLLED_BACK), release_failed=False)
    assert plan.failed_versions([stopped]) == set()
    failed_before = [_entry("0.1.0", "0.3.0", ROLLED_BACK), replace(stopped, id="again")]
    assert plan.failed_versions(failed_before) == {"0.3.0"}
    # An older line says nothing of it (None): a rollback counts, as it always did.
    assert plan.failed_versions([replace(stopped, release_failed=None)]) == {"0.3.0"}


def test_previous_comes_from_the_update_that_installed_current() -> None:
    entries = [_entry("0.1.0", "0.2.0", UPDATED), _entry("0.2.0", "0.3.0", UPDATED)]
    assert plan.choose_previous(entries, "0.3.0", ["0.1.0", "0.2.0", "0.3.0"]) == "0.2.0"


def test_previous_falls_back_to_newest_older_kept_release() -> None:
    assert plan.choose_previous([], "0.3.0", ["0.1.0", "0.2.0", "0.3.0", "0.4.0"]) == "0.2.0"


def test_a_reinstall_does_not_hide_the_release_before_it() -> None:
    """After `--force` (0.3.0 -> 0.3.0) the way back is still 0.2.0."""
    entries = [_entry("0.2.0", "0.3.0", UPDATED), _entry("0.3.0", "0.3.0", UPDATED)]
    assert plan.previous_release(entries, "0.3.0", {"0.2.0", "0.3.0"}) == "0.2.0"
    assert plan.choose_previous(entries, "0.3.0", ["0.2.0", "0.3.0"]) == "0.2.0"


def test_the_fallback_never_picks_a_release_that_never_ran_here() -> None:
    """0.2.0 was only pre-staged (--stage --allow-downgrade): not a way back. With
    history naming a source no longer kept, the fallback takes what ran here."""
    entries = [_entry("0.1.0", "0.3.0", UPDATED), _entry("0.3.0", "0.4.0", UPDATED)]
    kept = ["0.1.0", "0.2.0", "0.4.0"]
    assert plan.choose_previous(entries, "0.4.0", kept) == "0.1.0"
    assert plan.choose_previous(entries, "0.4.0", ["0.2.0", "0.4.0"]) is None
    # With no history at all there is nothing to tell them apart by.
    assert plan.choose_previous([], "0.4.0", ["0.2.0", "0.4.0"]) == "0.2.0"


def test_the_rollback_target_is_never_pruned() -> None:
    releases = [ReleaseDir(v, v, True) for v in ("1.0.0", "1.1.0", "1.7.0", "1.8.0")]
    doomed = plan.to_prune(
        releases, current="1.1.0", previous="1.1.0", failed=set(), rollback_target="1.0.0"
    )
    assert doomed == ["1.7.0"]


def test_no_previous_when_nothing_older_is_kept() -> None:
    assert plan.choose_previous([], "0.1.0", ["0.1.0"]) is None


def test_a_directory_that_is_no_version_hides_no_release_to_go_back_to() -> None:
    """One stray name under releases/ made the whole fallback give up."""
    assert plan.choose_previous([], "0.3.0", ["0.1.0", "backup", "0.2.0", "0.3.0"]) == "0.2.0"
    assert plan.choose_previous([], "0.3.0", ["backup", "0.3.0"]) is None


LOADED = "LoadState=loaded\nNeedDaemonReload=no\n"


@pytest.mark.parametrize(
    ("output", "count", "stale"),
    [
        # Every unit loaded as it is on disk: no daemon-reload.
        (f"{LOADED}\n{LOADED}\n{LOADED}", 3, False),
        # A file or drop-in edited since it was loaded.
        (f"{LOADED}\nLoadState=loaded\nNeedDaemonReload=yes\n\n{LOADED}", 3, True),
        # A unit systemd has not loaded (installed without a reload).
        (f"{LOADED}\nLoadState=not-found\nNeedDaemonReload=no\n", 2, True),
        # An older systemd that does not say: reload, as before.
        ("LoadState=loaded\n\nLoadState=loaded\n", 2, True),
        # Fewer answers than units asked about: not trusted.
        (LOADED, 2, True),
        ("", 1, True),
    ],
)
def test_a_daemon_reload_is_skipped_only_on_a_clear_no_for_every_unit(
    output: str, count: int, stale: bool
) -> None:
    assert systemd.stale(output, count) is stale


@pytest.mark.parametrize(
    ("output", "loaded"),
    [
        # After a daemon-reload (the values systemd 252 showed in a test machine).
        (
            "UnitsLoadStartTimestampMonotonic=52773466033\nUnitsLoadTimestampMonotonic=52784610758\n",
            52784610758,
        ),
        # Booted, never reloaded: the reload's is 0, the boot's load counts.
        (
            "UnitsLoadStartTimestampMonotonic=52773466033\nUnitsLoadTimestampMonotonic=0\n",
            52773466033,
        ),
        # Neither said: unknown (the switch then reloads).
        ("UnitsLoadTimestampMonotonic=0\n", None),
        ("", None),
    ],
)
def test_when_systemd_last_loaded_its_units(output: str, loaded: int | None) -> None:
    assert systemd.last_load(output) == loaded
