"""The CLI's behaviour that needs no server: usage errors, config lookup, unreachable server.

Every server here is a loopback port that is bound but not listening, so a
connection attempt is refused at once; exit code 2 proves nothing was sent,
exit code 3 proves the CLI tried the URL it names.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from scalebox import __version__
from scalebox.cli.main import save_login
from scalebox.errors import ConfigError

from .conftest import Cli

TOKEN = "sb-" + "c" * 48
PUBLIC_KEY = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBvG0Y2Kt0eQ4vJ0p8uJ5b5h2nAq9F0dQ0y9xkqk7x9Z me@host"
)


def write_user_config(home: Path, text: str) -> Path:
    path = home / ".config" / "scalebox" / "config"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def assert_one_error_line(stderr: str, starts: str) -> None:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"scalebox: error: {starts}"), stderr


def test_help_documents_every_exit_code_via_the_installed_entry_point() -> None:
    exe = Path(sys.executable).parent / "scalebox"
    done = subprocess.run([exe, "--help"], capture_output=True, text=True, check=False)
    assert done.returncode == 0
    for line in (
        "0  success",
        "1  the server answered with an error",
        "2  usage",
        "3  cannot reach the server",
        "4  the server refused the token",
        "5  the VM or template does not exist",
    ):
        assert line in done.stdout
    assert "/etc/scalebox/config" in done.stdout


def test_version_is_printed(scalebox: Cli) -> None:
    result = scalebox("--version")
    assert result.exit_code == 0
    assert __version__ in result.stdout


def test_unreachable_server_is_one_line_and_exit_3(scalebox: Cli, dead_url: str) -> None:
    result = scalebox("status", SCALEBOX_URL=dead_url)
    assert result.exit_code == 3
    assert result.stdout == ""
    assert_one_error_line(result.stderr, f"cannot reach the Scalebox server at {dead_url} (")
    assert "Connection refused" in result.stderr
    assert "scaleboxd is running" in result.stderr


def test_unreachable_server_with_json_still_exits_3(scalebox: Cli, dead_url: str) -> None:
    result = scalebox("vm", "list", "--json", SCALEBOX_URL=dead_url, SCALEBOX_TOKEN=TOKEN)
    assert result.exit_code == 3
    assert result.stdout == ""


def test_user_config_file_is_used(scalebox: Cli, home: Path, dead_url: str) -> None:
    write_user_config(home, f"SCALEBOX_URL={dead_url}\nSCALEBOX_TOKEN={TOKEN}\n")
    result = scalebox("vm", "list")
    assert result.exit_code == 3
    assert dead_url in result.stderr


def test_environment_overrides_user_config_file(scalebox: Cli, home: Path, dead_url: str) -> None:
    write_user_config(home, f"SCALEBOX_URL=http://127.0.0.1:9\nSCALEBOX_TOKEN={TOKEN}\n")
    result = scalebox("status", SCALEBOX_URL=dead_url)
    assert result.exit_code == 3
    assert dead_url in result.stderr
    assert "127.0.0.1:9" not in result.stderr


def test_xdg_config_home_is_honoured(scalebox: Cli, tmp_path: Path, dead_url: str) -> None:
    xdg = tmp_path / "xdg"
    (xdg / "scalebox").mkdir(parents=True)
    (xdg / "scalebox" / "config").write_text(f"SCALEBOX_URL={dead_url}\n")
    result = scalebox("status", XDG_CONFIG_HOME=str(xdg))
    assert result.exit_code == 3
    assert dead_url in result.stderr


def test_no_server_configured_is_a_usage_error(scalebox: Cli) -> None:
    result = scalebox("status")
    assert result.exit_code == 2
    assert_one_error_line(result.stderr, "no Scalebox server is configured; run `scalebox login`")


def test_no_token_is_a_usage_error_before_anything_is_sent(scalebox: Cli, dead_url: str) -> None:
    result = scalebox("vm", "list", SCALEBOX_URL=dead_url)
    assert result.exit_code == 2
    assert_one_error_line(result.stderr, "no API token is configured")


def test_broken_config_file_names_file_and_line(scalebox: Cli, home: Path) -> None:
    path = write_user_config(home, "SCALEBOX_URL=http://127.0.0.1:8080\noops\n")
    result = scalebox("status")
    assert result.exit_code == 2
    assert_one_error_line(result.stderr, f"{path} line 2: expected KEY=VALUE")


def test_unknown_option_is_a_click_usage_error(scalebox: Cli) -> None:
    result = scalebox("vm", "list", "--colour")
    assert result.exit_code == 2
    assert "No such option" in result.stderr


def test_zero_vcpus_is_refused(scalebox: Cli, dead_url: str) -> None:
    result = scalebox(
        "vm",
        "create",
        "--ssh-public-key",
        PUBLIC_KEY,
        "--vcpu",
        "0",
        SCALEBOX_URL=dead_url,
        SCALEBOX_TOKEN=TOKEN,
    )
    assert result.exit_code == 2
    assert "--vcpu" in result.stderr


def test_both_key_options_are_refused(scalebox: Cli, home: Path, dead_url: str) -> None:
    key = home / "k.pub"
    key.write_text(PUBLIC_KEY + "\n")
    result = scalebox(
        "vm",
        "create",
        "--ssh-key",
        str(key),
        "--ssh-public-key",
        PUBLIC_KEY,
        SCALEBOX_URL=dead_url,
        SCALEBOX_TOKEN=TOKEN,
    )
    assert result.exit_code == 2
    assert_one_error_line(result.stderr, "--ssh-key and --ssh-public-key were both given")


def test_private_key_file_is_never_sent(scalebox: Cli, home: Path, dead_url: str) -> None:
    key = home / "id_ed25519"
    key.write_text(
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaA==\n-----END OPENSSH PRIVATE KEY-----\n"
    )
    result = scalebox(
        "vm", "create", "--ssh-key", str(key), SCALEBOX_URL=dead_url, SCALEBOX_TOKEN=TOKEN
    )
    assert result.exit_code == 2  # 3 would mean it tried to send it
    assert_one_error_line(result.stderr, f"{key} holds a PRIVATE key; it was not sent")


def test_missing_default_key_says_what_to_do(scalebox: Cli, home: Path, dead_url: str) -> None:
    result = scalebox("vm", "create", SCALEBOX_URL=dead_url, SCALEBOX_TOKEN=TOKEN)
    assert result.exit_code == 2
    assert_one_error_line(result.stderr, "no SSH public key given and none found at ")
    assert str(home / ".ssh" / "id_ed25519.pub") in result.stderr
    assert "ssh-keygen -t ed25519" in result.stderr


def test_default_rsa_key_is_picked_up(scalebox: Cli, home: Path, dead_url: str) -> None:
    (home / ".ssh").mkdir()
    (home / ".ssh" / "id_rsa.pub").write_text("ssh-rsa AAAAB3NzaC1yc2E me@host\n")
    result = scalebox("vm", "create", SCALEBOX_URL=dead_url, SCALEBOX_TOKEN=TOKEN)
    assert result.exit_code == 3  # got past key selection and tried the server


def test_not_a_public_key_is_refused(scalebox: Cli, dead_url: str) -> None:
    result = scalebox(
        "vm",
        "create",
        "--ssh-public-key",
        "hello world",
        SCALEBOX_URL=dead_url,
        SCALEBOX_TOKEN=TOKEN,
    )
    assert result.exit_code == 2
    assert "is not an SSH public key" in result.stderr


def test_bad_names_are_refused_before_sending(scalebox: Cli, dead_url: str) -> None:
    env = {"SCALEBOX_URL": dead_url, "SCALEBOX_TOKEN": TOKEN}
    for args in (
        ("vm", "get", ".."),
        ("vm", "delete", "a/b"),
        ("vm", "snapshot", "vm-1", "../etc"),
        ("template", "delete", "a b"),
        ("vm", "create", "--ssh-public-key", PUBLIC_KEY, "--template", "x/y"),
    ):
        result = scalebox(*args, **env)
        assert result.exit_code == 2, (args, result.stderr)
        assert result.stderr.startswith("scalebox: error: "), (args, result.stderr)


def test_login_to_unreachable_server_saves_nothing(
    scalebox: Cli, home: Path, dead_url: str
) -> None:
    result = scalebox("login", "--url", dead_url, "--token", TOKEN)
    assert result.exit_code == 3
    assert not (home / ".config" / "scalebox" / "config").exists()


def test_login_refuses_a_bad_url_before_asking_the_server(scalebox: Cli, home: Path) -> None:
    result = scalebox("login", "--url", "127.0.0.1:8080", "--token", TOKEN)
    assert result.exit_code == 2
    assert_one_error_line(result.stderr, "--url: '127.0.0.1:8080' is not a server URL")
    assert not (home / ".config").exists()


def test_saved_login_is_private_from_the_start(tmp_path: Path) -> None:
    path = tmp_path / "cfg" / "scalebox" / "config"
    old_umask = os.umask(0)  # the most permissive umask: modes must not depend on it
    try:
        save_login(path, "http://127.0.0.1:8080", TOKEN)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.read_text().splitlines()[1:] == [
        "SCALEBOX_URL=http://127.0.0.1:8080",
        f"SCALEBOX_TOKEN={TOKEN}",
    ]


def test_saved_login_replaces_a_world_readable_file_with_a_private_one(tmp_path: Path) -> None:
    path = tmp_path / "config"
    path.write_text("SCALEBOX_URL=http://old\n")
    path.chmod(0o644)
    save_login(path, "http://127.0.0.1:8080", TOKEN)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "http://old" not in path.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["config"]  # no temp file left behind


def test_saved_login_writes_through_a_symlinked_config(tmp_path: Path) -> None:
    """A config kept in a dotfiles checkout stays there: the link is not replaced."""
    real = tmp_path / "dotfiles" / "scalebox-config"
    real.parent.mkdir()
    real.write_text("SCALEBOX_URL=http://old\n")
    link = tmp_path / "cfg" / "config"
    link.parent.mkdir()
    link.symlink_to(real)
    save_login(link, "http://127.0.0.1:8080", TOKEN)
    assert link.is_symlink()
    assert f"SCALEBOX_TOKEN={TOKEN}" in real.read_text()
    assert stat.S_IMODE(real.stat().st_mode) == 0o600


def test_saved_login_through_a_symlink_loop_or_into_a_missing_folder(tmp_path: Path) -> None:
    """A loop was a RuntimeError traceback; a link into a folder not made yet failed."""
    loop = tmp_path / "config"
    loop.symlink_to(tmp_path / "other")
    (tmp_path / "other").symlink_to(loop)
    with pytest.raises(ConfigError) as caught:
        save_login(loop, "http://127.0.0.1:8080", TOKEN)
    assert f"cannot be saved to {loop}: it is a symlink that leads back to itself" in str(
        caught.value
    )
    assert loop.is_symlink() and (tmp_path / "other").is_symlink()  # neither written over
    dangling = tmp_path / "cfg" / "config"
    dangling.parent.mkdir()
    real = tmp_path / "dotfiles" / "scalebox" / "config"
    dangling.symlink_to(real)
    save_login(dangling, "http://127.0.0.1:8080", TOKEN)
    assert dangling.is_symlink() and f"SCALEBOX_TOKEN={TOKEN}" in real.read_text()
    assert stat.S_IMODE(real.parent.stat().st_mode) == 0o700


def test_key_at_a_missing_file_is_refused_before_sending(scalebox: Cli, dead_url: str) -> None:
    result = scalebox(
        "vm", "create", "-k", "@/nonexistent/k.pub", SCALEBOX_URL=dead_url, SCALEBOX_TOKEN=TOKEN
    )
    assert result.exit_code == 2
    assert_one_error_line(result.stderr, "-k @/nonexistent/k.pub: no such file")


def test_key_text_and_a_key_file_together_are_refused(
    scalebox: Cli, home: Path, dead_url: str
) -> None:
    key = home / "k.pub"
    key.write_text(PUBLIC_KEY + "\n")
    result = scalebox(
        "vm", "create", "-k", PUBLIC_KEY, "--ssh-key", str(key),
        SCALEBOX_URL=dead_url, SCALEBOX_TOKEN=TOKEN,
    )  # fmt: skip
    assert result.exit_code == 2
    assert_one_error_line(result.stderr, "-k/--key and --ssh-key were both given")


def test_key_text_that_is_a_private_key_is_never_sent(scalebox: Cli, dead_url: str) -> None:
    result = scalebox(
        "vm", "create", "-k", "-----BEGIN OPENSSH PRIVATE KEY-----",
        SCALEBOX_URL=dead_url, SCALEBOX_TOKEN=TOKEN,
    )  # fmt: skip
    assert result.exit_code == 2
    assert_one_error_line(result.stderr, "-k/--key holds a PRIVATE key; it was not sent")


def test_short_options_reach_the_server(scalebox: Cli, dead_url: str) -> None:
    """-t -n -m -d -k pass the CLI's checks (exit 3: it tried the server)."""
    result = scalebox(
        "vm", "create", "-t", "debian-base", "-n", "box", "-m", "256", "-d", "1", "-k", PUBLIC_KEY,
        SCALEBOX_URL=dead_url, SCALEBOX_TOKEN=TOKEN,
    )  # fmt: skip
    assert result.exit_code == 3, result.stderr


def test_snapshot_needs_exactly_one_template_name(scalebox: Cli, dead_url: str) -> None:
    env = {"SCALEBOX_URL": dead_url, "SCALEBOX_TOKEN": TOKEN}
    neither = scalebox("vm", "snapshot", "box", **env)
    assert neither.exit_code == 2
    assert_one_error_line(neither.stderr, "no template name given")
    both = scalebox("vm", "snapshot", "box", "one", "-n", "two", **env)
    assert both.exit_code == 2
    assert_one_error_line(both.stderr, "the template name was given twice")
    assert scalebox("vm", "snapshot", "box", "-n", "two", **env).exit_code == 3


def test_vm_ssh_options_after_vm_are_refused_not_sent_as_the_command(
    scalebox: Cli, dead_url: str
) -> None:
    """`vm ssh box --print` ran ssh with "--print" as the VM's command; exit 2 proves
    nothing was sent. After `--` the same words are the command."""
    for option in ("--print", "-i", "-o", "-oBatchMode=yes", "--identity=/k"):
        result = scalebox("vm", "ssh", "box", option, SCALEBOX_URL=dead_url, SCALEBOX_TOKEN=TOKEN)
        assert result.exit_code == 2, (option, result.output)
        assert_one_error_line(result.stderr, f"{option} comes after VM")
    result = scalebox(
        "vm", "ssh", "box", "--", "--print", SCALEBOX_URL=dead_url, SCALEBOX_TOKEN=TOKEN
    )
    assert result.exit_code == 3, result.output  # tried the server: a command, not an option


def test_a_key_file_that_is_too_big_is_refused_without_reading_it_all(
    scalebox: Cli, dead_url: str
) -> None:
    """/dev/zero as the key took 2.7 GB of memory in 4 s."""
    result = scalebox(
        "vm", "create", "--ssh-key", "/dev/zero", SCALEBOX_URL=dead_url, SCALEBOX_TOKEN=TOKEN
    )
    assert result.exit_code == 2, result.output
    assert_one_error_line(result.stderr, "/dev/zero is larger than 64 KiB")


def test_login_whose_prompt_gets_no_input_is_a_usage_error(scalebox: Cli) -> None:
    """click's "Aborted!" and exit 1, which the table calls an API error."""
    result = scalebox("login", input="")
    assert result.exit_code == 2, result.output
    assert_one_error_line(result.stderr, "no answer to the prompt")


def test_login_that_cannot_save_says_so_in_one_line(tmp_path: Path) -> None:
    """A read-only or full HOME raised an OSError traceback after the server said yes."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="the server accepted the token, but it cannot be"):
        save_login(blocker / "scalebox" / "config", "http://127.0.0.1:1", TOKEN)


# The real entry point, with a Ctrl-C (SIGINT to itself) as it imports the CLI.
CTRL_C_WHILE_IMPORTING = """
import builtins, os, signal
from scalebox.cli import entry

real_import = builtins.__import__

def importing(name, *args, **kwargs):
    if name == "scalebox.cli.main":
        os.kill(os.getpid(), signal.SIGINT)
    return real_import(name, *args, **kwargs)

builtins.__import__ = importing
entry.main()
"""


def test_a_ctrl_c_while_the_cli_imports_is_an_interruption_not_a_traceback() -> None:
    done = subprocess.run(
        [sys.executable, "-c", CTRL_C_WHILE_IMPORTING, "status"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 130, done.stderr
    assert done.stderr == "scalebox: interrupted\n"
