"""After an update: does the new release build a newer VM template than the installed one?

The new release's own code answers (``python -m scalebox.daemon.vms.templates
status``), so an old updater learns about a template version it never knew.
Rebuilding is left to the operator: it takes a minute or two and a Debian
mirror, and never touches running VMs or snapshots (docs/operations.md).
"""

from __future__ import annotations

from scalebox.daemon.vms.templates import STATUS_OUTDATED
from scalebox.runner import ProgramError, run_program
from scalebox.update.paths import Paths


def notice(paths: Paths) -> str | None:
    """The line that says the template needs rebuilding, and how; None when it does not."""
    python = paths.current / "venv" / "bin" / "python"
    argv = [str(python), "-I", "-m", "scalebox.daemon.vms.templates", "status",
            "--config", str(paths.config)]  # fmt: skip
    try:
        done = run_program(argv, timeout=60, new_session=True)
    except ProgramError:
        return None  # a release without templates (0.1.0), or none runnable: nothing to say
    if done.returncode != STATUS_OUTDATED:
        return None
    return done.stdout.strip() or None
