"""The one parser for ``systemctl show`` output.

``systemctl show -p A,B U1 U2`` prints KEY=VALUE lines, one block per unit,
blocks separated by an empty line. Used by the updater (scaleboxd's state)
and by the daemon (its VM units). Pure.
"""

from __future__ import annotations


def parse_blocks(text: str) -> list[dict[str, str]]:
    """One dict of properties per unit, in the order systemctl printed them."""
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if current:
                blocks.append(current)
                current = {}
            continue
        key, sep, value = line.partition("=")
        if sep:
            # Only the first '=' splits: values such as ExecStart hold '=' themselves.
            current[key.strip()] = value.strip()
    if current:
        blocks.append(current)
    return blocks


def parse(text: str) -> dict[str, str]:
    """The properties of one unit (the first block; empty when there is none)."""
    blocks = parse_blocks(text)
    return blocks[0] if blocks else {}


def number(props: dict[str, str], key: str) -> int:
    """A non-negative integer property such as MainPID or NRestarts; 0 when absent or not one."""
    raw = props.get(key, "")
    return int(raw) if raw.isdigit() else 0
