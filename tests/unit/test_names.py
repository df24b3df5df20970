"""The one naming rule (scalebox.names), with cases written by hand.

The daemon and the CLI both call it; the last tests prove they agree on the
same input, so the 63 vs 64 split of the old copies cannot come back.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from scalebox import names
from scalebox.cli.main import cli
from scalebox.daemon.errors import InvalidInput
from scalebox.daemon.vms import naming

# (value, valid as a VM name, valid as a template name, valid as a VM id or name)
CASES = [
    ("a", True, True, True),
    ("My_box-2", True, True, True),
    ("x" * 63, True, True, True),
    ("x" * 64, False, True, False),  # a DNS label is at most 63; a template dir may be 64
    ("x" * 65, False, False, False),
    ("vm-0123456789ab", False, True, True),  # id-shaped: an id, never a new VM's name
    ("vm-0123456789AB", True, True, True),  # not an id: ids are lower-case hex
    ("vm-box", True, True, True),
    ("", False, False, False),
    ("..", False, False, False),
    ("a/b", False, False, False),
    ("a b", False, False, False),
    ("a.b", False, False, False),
    ("é", False, False, False),
    ("a\n", False, False, False),  # `$` in a regex would let this one through
    ("\na", False, False, False),
    ("a\0", False, False, False),
]


@pytest.mark.parametrize(("value", "vm_name", "template", "ref"), CASES)
def test_each_rule_on_hand_written_cases(
    value: str, vm_name: bool, template: bool, ref: bool
) -> None:
    assert (names.vm_name_problem(value) is None) is vm_name
    assert (names.template_name_problem(value) is None) is template
    assert (names.vm_ref_problem(value) is None) is ref


def test_the_problem_names_the_field_and_the_rule() -> None:
    assert names.vm_name_problem("x" * 64, "--name") == (
        f"--name {'x' * 64!r} is invalid: use 1 to 63 letters, digits, '_' or '-'"
    )
    assert names.template_name_problem("a/b") == (
        "template name 'a/b' is invalid: use 1 to 64 letters, digits, '_' or '-'"
    )
    assert names.vm_name_problem("vm-0123456789ab") == (
        "VM name 'vm-0123456789ab' looks like a VM id: choose a name that does not start with 'vm-'"
    )


def test_a_long_value_is_cut_in_the_message() -> None:
    problem = names.vm_ref_problem("y" * 5000)
    assert problem is not None and len(problem) < 200


@pytest.fixture
def dead_url() -> Iterator[str]:
    """A loopback port that is bound but never listened on: connecting is refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize(("value", "vm_name", "template", "ref"), CASES)
def test_the_daemon_and_the_cli_agree(
    value: str, vm_name: bool, template: bool, ref: bool, dead_url: str
) -> None:
    """Same input, same verdict: the daemon's check and the CLI's refusal (exit 2)."""
    try:
        naming.check_vm_name(value)
        daemon_accepts = True
    except InvalidInput:
        daemon_accepts = False
    assert daemon_accepts is vm_name

    # An unreachable URL: a name the CLI accepts gets as far as the network (exit 3);
    # one it refuses stops at exit 2 before anything is sent.
    env = {"SCALEBOX_URL": dead_url, "SCALEBOX_TOKEN": "sb-" + "c" * 48}
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBvG0Y2Kt0eQ4vJ0p8uJ5b5h2nAq9F0dQ0y9xkqk7x9Z a@b"
    runner = CliRunner()
    created = runner.invoke(cli, ["vm", "create", "-k", key, "--name", value], env=env)
    assert created.exit_code == (3 if vm_name else 2), created.output
    deleted = runner.invoke(cli, ["template", "delete", value], env=env)
    assert deleted.exit_code == (3 if template else 2), deleted.output
    got = runner.invoke(cli, ["vm", "get", value], env=env)
    assert got.exit_code == (3 if ref else 2), got.output
