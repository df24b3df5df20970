"""The updater's work that can wait gives the CPU to the daemon serving (scalebox/priority.py).

Staging the next release before the switch, and the commit and pruning
after it is verified, run at a lower CPU priority while a scaleboxd serves
this server (daemon/serving.py: a shared lock on the config's folder). With
nobody serving (an update run to bring a dead service back) there is nobody
to give way to, and no client to spare: the update runs at full priority.
It gives way for ``GIVE_WAY_SECONDS`` at most: on a server whose CPU is
saturated by busy VMs a lowered process gets a few percent of a core, and a
stage of a second would take minutes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from scalebox import priority
from scalebox.daemon import serving
from scalebox.update import interrupt

# From the updater's start: a download counts too (a few seconds; little CPU).
GIVE_WAY_SECONDS = 30.0


def give_way(config: Path, report: priority.Warn) -> bool:
    """Lower this process and the session it shares until ``priority.restore_process()``,
    if a scaleboxd serves with ``config``. Whether it did."""
    if not serving.others_serve(str(config)):
        return False
    priority.lower_process(report, priority.Session.SHARED, at_most=GIVE_WAY_SECONDS)
    return True


@contextmanager
def waiting(config: Path, report: priority.Warn) -> Iterator[None]:
    """Run the block lowered (give_way) and end it back at full priority. Shielded, the
    lowering too: a signal between it and the restore would leave the session it
    shares (sudo's, or a root shell's) lowered."""
    with interrupt.shielded():
        give_way(config, report)
        try:
            yield
        finally:
            priority.restore_process(report)
