"""Pure decisions about names, ids, numbers and ports; no side effects."""

from __future__ import annotations

import base64
import binascii
import re
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


KEY_TYPES = frozenset({
    "ssh-ed25519", "ssh-rsa", "ssh-dss", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521", "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com",
})  # fmt: skip


def _key_problem(line: str, strict: bool) -> str | None:
    """What is wrong with one authorized_keys line ``type base64 [comment]``, or None.

    Fields are split as sshd splits them, on spaces and tabs only (see _odd_character).
    """
    fields = [field for field in re.split(r"[ \t]+", line) if field]
    if len(fields) < 2:
        return "expected 'TYPE BASE64 [comment]'"
    kind, blob = fields[0], fields[1]
    if kind not in KEY_TYPES:
        return f"unknown key type {kind[:40]!r}"
    if not strict:
        return None
    try:
        raw = base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError):
        return "the key data is not base64"
    # The blob starts with its own type as an SSH string: uint32 length, bytes.
    length = int.from_bytes(raw[:4], "big")
    if raw[4 : 4 + length].decode(errors="replace") != kind or len(raw) <= 4 + length:
        return f"the key data is not a {kind} key"
    return None


def _odd_character(line: str) -> str | None:
    """Whitespace or a control character other than space and tab, said as a problem:
    sshd would read such a line otherwise than _key_problem and skip the key."""
    odd = next((c for c in line if not c.isprintable() and c != "\t"), None)
    if odd is None:
        return None
    return f"the character U+{ord(odd):04X} is not allowed (only spaces and tabs separate)"


def check_ssh_key(value: object, *, strict: bool = False) -> str:
    """One or more public keys (LF or CRLF lines), normalised to LF lines.

    Every non-empty line must be ``TYPE BASE64 [comment]`` with a known TYPE;
    ``strict`` (keys that go into a real authorized_keys) also decodes the
    key data and checks it names the same type.
    """
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(
            "ssh_public_key must be a non-empty string",
            "send the content of your ~/.ssh/id_ed25519.pub",
        )
    if len(value) > MAX_SSH_KEY_LEN or "\0" in value:
        raise InvalidInput(
            f"ssh_public_key must be at most {MAX_SSH_KEY_LEN} characters of text",
            "send the content of one or a few .pub files",
        )
    lines = [line.strip() for line in value.replace("\r\n", "\n").split("\n")]
    keys = [line for line in lines if line and not line.startswith("#")]
    for number, line in enumerate(keys, start=1):
        if "\r" in line:
            problem: str | None = "a stray carriage return"
        else:
            problem = _odd_character(line) or _key_problem(line, strict)
        if problem is not None:
            where = f"key {number} of {len(keys)}" if len(keys) > 1 else "it"
            raise InvalidInput(
                f"ssh_public_key is not an SSH public key: {where} ({line[:40]!r}...): {problem}",
                "send the content of a .pub file, e.g. ~/.ssh/id_ed25519.pub (one key per line)",
            )
    if not keys:
        raise InvalidInput("ssh_public_key holds no key, only comments or blank lines",
                           "send the content of your ~/.ssh/id_ed25519.pub")  # fmt: skip
    return "\n".join(keys)


def pick_port(
    used: Collection[int], lo: int, hi: int, is_free: Callable[[int], bool]
) -> int | None:
    """The lowest port in ``lo..hi`` that no VM uses and ``is_free`` accepts, or None."""
    for port in range(lo, hi + 1):
        if port not in used and is_free(port):
            return port
    return None
