"""Pure decisions about names, ids, numbers and ports; no side effects."""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Collection

from scalebox.daemon.errors import InvalidInput

VM_ID_RE = re.compile(r"^vm-[0-9a-f]{12}$")
NAME_RE = re.compile(r"^[a-zA-Z0-9_-]+$")
# A VM name becomes a DNS label (<name>.<VM_DOMAIN>), which is at most 63 characters.
MAX_VM_NAME_LEN = 63
MAX_TEMPLATE_NAME_LEN = 64
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


def check_name(value: object, field: str, max_len: int) -> str:
    """``value`` as a name of letters, digits, ``_``, ``-``; else InvalidInput naming ``field``."""
    if not isinstance(value, str):
        raise InvalidInput(f"{field} must be a string", f"send {field} as a JSON string")
    if not value or len(value) > max_len or not NAME_RE.fullmatch(value):
        raise InvalidInput(
            f"{field} {value[:80]!r} is invalid: use 1 to {max_len} letters, digits, '_' or '-'",
            f"choose a {field} that matches ^[a-zA-Z0-9_-]+$",
        )
    return value


def check_template_name(value: object, field: str = "template") -> str:
    return check_name(value, field, MAX_TEMPLATE_NAME_LEN)


def check_vm_name(value: object) -> str:
    name = check_name(value, "name", MAX_VM_NAME_LEN)
    if VM_ID_RE.fullmatch(name):
        # get_vm looks names and ids up in one namespace; an id-shaped name would be ambiguous.
        raise InvalidInput(
            f"name {name!r} looks like a VM id", "choose a name that does not start with 'vm-'"
        )
    return name


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
