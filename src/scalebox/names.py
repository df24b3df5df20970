"""The one rule for template names, VM names and VM ids.

Used by the daemon (to refuse a request) and by the CLI (to refuse before
anything is sent), so both say the same thing about the same input. Pure:
each check returns the problem in words, or None; the caller raises its own
program's error with it. Imports nothing else from scalebox, so the CLI does
not pull in the daemon.
"""

from __future__ import annotations

import re

NAME_CHARS = re.compile(r"[a-zA-Z0-9_-]+")
VM_ID = re.compile(r"vm-[0-9a-f]{12}")
# A VM name becomes a DNS label (<name>.<VM_DOMAIN>), which is at most 63 characters.
MAX_VM_NAME_LEN = 63
# Templates are directory names, never DNS labels; 64 was always accepted and
# an existing template must stay reachable (values only widen).
MAX_TEMPLATE_NAME_LEN = 64
# A reference is a VM id or a VM name, looked up in one namespace.
MAX_VM_REF_LEN = MAX_VM_NAME_LEN

ALLOWED = "letters, digits, '_' or '-'"


def _shown(value: str) -> str:
    return repr(value[:80])


def name_problem(value: str, max_len: int, what: str) -> str | None:
    """Why ``value`` is not 1..``max_len`` of [a-zA-Z0-9_-], or None when it is."""
    if not value or len(value) > max_len or not NAME_CHARS.fullmatch(value):
        return f"{what} {_shown(value)} is invalid: use 1 to {max_len} {ALLOWED}"
    return None


def template_name_problem(value: str, what: str = "template name") -> str | None:
    return name_problem(value, MAX_TEMPLATE_NAME_LEN, what)


def vm_name_problem(value: str, what: str = "VM name") -> str | None:
    """A name for a new VM: the name rule, and not shaped like an id."""
    problem = name_problem(value, MAX_VM_NAME_LEN, what)
    if problem is None and VM_ID.fullmatch(value):
        # get_vm looks names and ids up in one namespace; an id-shaped name would be ambiguous.
        return (
            f"{what} {_shown(value)} looks like a VM id: "
            "choose a name that does not start with 'vm-'"
        )
    return problem


def vm_ref_problem(value: str, what: str = "VM id or name") -> str | None:
    """An existing VM's id or name (as a URL path segment or a CLI argument)."""
    return name_problem(value, MAX_VM_REF_LEN, what)


def is_vm_id(value: str) -> bool:
    return VM_ID.fullmatch(value) is not None
