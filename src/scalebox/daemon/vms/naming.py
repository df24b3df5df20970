"""Pure decisions about names, ids, numbers and ports; no side effects."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Collection

from scalebox import names
from scalebox.daemon.errors import InvalidInput

# The rule itself lives in scalebox.names, shared with the CLI.
VM_ID_RE = names.VM_ID
NAME_RE = names.NAME_CHARS
MAX_VM_NAME_LEN = names.MAX_VM_NAME_LEN
MAX_TEMPLATE_NAME_LEN = names.MAX_TEMPLATE_NAME_LEN
MAX_SSH_KEY_LEN = 16384

ADVERBS = (
    "boldly", "brightly", "calmly", "cleverly", "eagerly", "gently", "gladly", "happily",
    "keenly", "kindly", "lightly", "loudly", "madly", "neatly", "nicely", "openly",
    "proudly", "quickly", "quietly", "rapidly", "really", "sharply", "simply", "slowly",
    "smoothly", "softly", "swiftly", "truly", "vastly", "warmly", "wildly", "wisely",
)  # fmt: skip
ADJECTIVES = (
    "amber", "ancient", "brave", "bright", "calm", "clever", "crisp", "dapper",
    "eager", "fancy", "gentle", "golden", "happy", "humble", "jolly", "keen",
    "lively", "lucky", "mellow", "merry", "nimble", "noble", "proud", "quiet",
    "rapid", "shiny", "silent", "steady", "sunny", "swift", "tidy", "witty",
)  # fmt: skip
NOUNS = (
    "badger", "beacon", "canyon", "cedar", "comet", "falcon", "fern", "forest",
    "glacier", "harbor", "heron", "island", "lagoon", "lantern", "maple", "meadow",
    "meteor", "otter", "panda", "pebble", "pine", "planet", "river", "robin",
    "summit", "thunder", "tiger", "valley", "walrus", "willow", "wombat", "zephyr",
)  # fmt: skip


def new_vm_id(taken: Collection[str] = ()) -> str:
    """A fresh ``vm-<12 hex>`` id not in ``taken``."""
    while True:
        vm_id = f"vm-{secrets.token_hex(6)}"
        if vm_id not in taken:
            return vm_id


def random_name(taken: Collection[str] = ()) -> str:
    """A fresh ``<adverb>-<adjective>-<noun>`` name; ``taken`` holds lower-cased names."""
    for _ in range(100):
        name = "-".join(secrets.choice(words) for words in (ADVERBS, ADJECTIVES, NOUNS))
        if name not in taken:
            return name
    # 32768 combinations: only a very full host gets here; a suffix keeps names unique.
    while True:
        name = f"{name}-{secrets.token_hex(2)}"
        if name not in taken:
            return name


def _checked(value: object, field: str, problem_of: Callable[[str, str], str | None]) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"{field} must be a string", f"send {field} as a JSON string")
    problem = problem_of(value, field)
    if problem is not None:
        raise InvalidInput(problem, f"choose a {field} that matches ^[a-zA-Z0-9_-]+$")
    return value


def check_template_name(value: object, field: str = "template") -> str:
    return _checked(value, field, names.template_name_problem)


def check_vm_name(value: object) -> str:
    return _checked(value, "name", names.vm_name_problem)


def check_int(value: object, field: str, lo: int, hi: int) -> int:
    """``value`` as a whole number in ``lo..hi``, else InvalidInput naming ``field``."""
    # bool is an int in Python, but true is never a size.
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        shown = repr(value) if not isinstance(value, int) or abs(value) < 10**12 else "too large"
        raise InvalidInput(
            f"{field} must be a whole number from {lo} to {hi} (got {shown})",
            f"send {field} between {lo} and {hi}, or leave it out for the default",
        )
    return value


def check_ssh_key(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(
            "ssh_public_key must be a non-empty string",
            "send the content of your ~/.ssh/id_ed25519.pub",
        )
    key = value.strip()
    if len(key) > MAX_SSH_KEY_LEN or any(c in key for c in "\r\n\0"):
        raise InvalidInput(
            f"ssh_public_key must be one line of at most {MAX_SSH_KEY_LEN} characters",
            "send the content of one .pub file",
        )
    return key


def pick_port(
    used: Collection[int], lo: int, hi: int, is_free: Callable[[int], bool]
) -> int | None:
    """The lowest port in ``lo..hi`` that no VM uses and ``is_free`` accepts, or None."""
    for port in range(lo, hi + 1):
        if port not in used and is_free(port):
            return port
    return None
