"""Where the CLI finds its server and token: environment, user file, /etc file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from scalebox.cli import settings
from scalebox.errors import ConfigError

TOKEN_A = "sb-" + "a" * 48
TOKEN_B = "sb-" + "b" * 48


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def system_file(tmp_path: Path) -> Path:
    return tmp_path / "etc" / "scalebox" / "config"


def test_user_file_is_under_home_dot_config(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path)}
    assert settings.user_config_path(env) == tmp_path / ".config" / "scalebox" / "config"


def test_xdg_config_home_wins_over_home(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path / "h"), "XDG_CONFIG_HOME": str(tmp_path / "x")}
    assert settings.user_config_path(env) == tmp_path / "x" / "scalebox" / "config"


def test_relative_xdg_config_home_is_ignored_as_the_spec_says(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path), "XDG_CONFIG_HOME": "relative/dir"}
    assert settings.user_config_path(env) == tmp_path / ".config" / "scalebox" / "config"


def test_system_file_is_used_when_nothing_else_is_set(tmp_path: Path, system_file: Path) -> None:
    write(system_file, f"SCALEBOX_URL=http://10.9.9.9:8080/\nSCALEBOX_TOKEN={TOKEN_A}\n")
    found = settings.load({"HOME": str(tmp_path)}, system_file)
    assert found.url == "http://10.9.9.9:8080"  # trailing slash dropped
    assert found.token == TOKEN_A
    assert found.url_source == f"{system_file} line 1"


def test_user_file_beats_system_file(tmp_path: Path, system_file: Path) -> None:
    write(system_file, f"SCALEBOX_URL=http://10.9.9.9:8080\nSCALEBOX_TOKEN={TOKEN_A}\n")
    user = write(
        tmp_path / ".config/scalebox/config",
        f"# mine\nSCALEBOX_URL=http://127.0.0.5:9000\nSCALEBOX_TOKEN={TOKEN_B}\n",
    )
    found = settings.load({"HOME": str(tmp_path)}, system_file)
    assert (found.url, found.token) == ("http://127.0.0.5:9000", TOKEN_B)
    assert found.token_source == f"{user} line 3"


def test_a_token_file_others_can_read_is_warned_about(tmp_path: Path, system_file: Path) -> None:
    user = write(tmp_path / ".config/scalebox/config", f"SCALEBOX_TOKEN={TOKEN_B}\n")
    user.chmod(0o644)
    found = settings.load({"HOME": str(tmp_path)}, system_file)
    assert found.token == TOKEN_B
    assert found.warnings == (
        f"{user} holds the API token and other users may read it (mode 0644): "
        f"run `chmod 600 {user}`",
    )
    user.chmod(0o600)
    assert settings.load({"HOME": str(tmp_path)}, system_file).warnings == ()


def test_a_system_token_file_may_be_shared_with_a_group(tmp_path: Path, system_file: Path) -> None:
    write(system_file, f"SCALEBOX_TOKEN={TOKEN_A}\n").chmod(0o640)
    assert settings.load({"HOME": str(tmp_path)}, system_file).warnings == ()
    system_file.chmod(0o644)
    (warning,) = settings.load({"HOME": str(tmp_path)}, system_file).warnings
    assert warning.startswith(f"{system_file} holds the API token and other users may read")


def test_environment_beats_both_files(tmp_path: Path, system_file: Path) -> None:
    write(system_file, f"SCALEBOX_URL=http://10.9.9.9:8080\nSCALEBOX_TOKEN={TOKEN_A}\n")
    write(tmp_path / ".config/scalebox/config", "SCALEBOX_URL=http://127.0.0.5:9000\n")
    env = {
        "HOME": str(tmp_path),
        "SCALEBOX_URL": "https://sb.example.test",
        "SCALEBOX_TOKEN": TOKEN_B,
    }
    found = settings.load(env, system_file)
    assert (found.url, found.token) == ("https://sb.example.test", TOKEN_B)
    assert found.url_source == "environment variable SCALEBOX_URL"


def test_each_key_is_searched_on_its_own(tmp_path: Path, system_file: Path) -> None:
    """A URL from the user file and a token from /etc (which names no URL) combine."""
    write(system_file, f"SCALEBOX_TOKEN={TOKEN_A}\n")
    write(tmp_path / ".config/scalebox/config", "SCALEBOX_URL=http://127.0.0.5:9000\n")
    found = settings.load({"HOME": str(tmp_path)}, system_file)
    assert (found.url, found.token) == ("http://127.0.0.5:9000", TOKEN_A)


def test_a_files_token_is_not_sent_to_another_servers_url(
    tmp_path: Path, system_file: Path
) -> None:
    write(
        tmp_path / ".config/scalebox/config",
        f"SCALEBOX_URL=http://127.0.0.5:9000\nSCALEBOX_TOKEN={TOKEN_A}\n",
    )
    found = settings.load(
        {"HOME": str(tmp_path), "SCALEBOX_URL": "http://127.0.0.6:9000"}, system_file
    )
    assert found.url == "http://127.0.0.6:9000"
    assert found.token is None
    with pytest.raises(ConfigError, match=r"is for http://127\.0\.0\.5:9000"):
        found.require_token()


def test_same_url_spelled_with_a_slash_keeps_the_files_token(
    tmp_path: Path, system_file: Path
) -> None:
    write(
        tmp_path / ".config/scalebox/config",
        f"SCALEBOX_URL=http://127.0.0.5:9000/\nSCALEBOX_TOKEN={TOKEN_A}\n",
    )
    env = {"HOME": str(tmp_path), "SCALEBOX_URL": "http://127.0.0.5:9000"}
    assert settings.load(env, system_file).token == TOKEN_A


def test_empty_environment_variable_counts_as_unset(tmp_path: Path, system_file: Path) -> None:
    write(tmp_path / ".config/scalebox/config", "SCALEBOX_URL=http://127.0.0.5:9000\n")
    found = settings.load({"HOME": str(tmp_path), "SCALEBOX_URL": ""}, system_file)
    assert found.url == "http://127.0.0.5:9000"


def test_nothing_configured_says_where_it_looked(tmp_path: Path, system_file: Path) -> None:
    found = settings.load({"HOME": str(tmp_path)}, system_file)
    with pytest.raises(ConfigError) as caught:
        found.require_url()
    assert "scalebox login" in str(caught.value.hint)
    assert str(system_file) in str(caught.value.hint)


def test_bad_url_names_its_source(tmp_path: Path, system_file: Path) -> None:
    user = write(tmp_path / ".config/scalebox/config", "\nSCALEBOX_URL=ftp://x\n")
    with pytest.raises(ConfigError, match=rf"{user} line 2: 'ftp://x' is not a server URL"):
        settings.load({"HOME": str(tmp_path)}, system_file)


def test_malformed_line_names_file_and_line(tmp_path: Path, system_file: Path) -> None:
    write(system_file, "SCALEBOX_URL=http://127.0.0.1:8080\nthis is not a setting\n")
    with pytest.raises(ConfigError, match="line 2: expected KEY=VALUE"):
        settings.load({"HOME": str(tmp_path)}, system_file)


def test_token_with_spaces_is_rejected(tmp_path: Path, system_file: Path) -> None:
    with pytest.raises(ConfigError, match="SCALEBOX_TOKEN: the token is empty or contains"):
        settings.load(
            {"HOME": str(tmp_path), "SCALEBOX_URL": "http://x", "SCALEBOX_TOKEN": "a b"},
            system_file,
        )


def test_unknown_key_is_a_warning_not_an_error(tmp_path: Path, system_file: Path) -> None:
    write(system_file, "SCALEBOX_URL=http://127.0.0.1:8080\nSCALEBOX_TOKNE=x\n")
    found = settings.load({"HOME": str(tmp_path)}, system_file)
    assert found.url == "http://127.0.0.1:8080"
    assert any("unknown key SCALEBOX_TOKNE" in w for w in found.warnings)


def test_the_environment_wins_over_a_broken_file(tmp_path: Path, system_file: Path) -> None:
    """First found wins: one admin's typo in /etc/scalebox/config broke every user and CI
    job that set both variables."""
    write(system_file, "this is not a setting\n")
    env = {"HOME": str(tmp_path), "SCALEBOX_URL": "http://127.0.0.1:9", "SCALEBOX_TOKEN": "t"}
    assert settings.load(env, system_file).url == "http://127.0.0.1:9"
    # Still told when the search needs that file: the token is missing.
    with pytest.raises(ConfigError, match="line 1: expected KEY=VALUE"):
        settings.load({**env, "SCALEBOX_TOKEN": ""}, system_file)


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://[::1", "is not a server URL"),
        ("http://127.0.0.1:abc", "is not a server URL"),
        ("http://127.0.0.1:99999", "is not a server URL"),
        ("http://me:s3cret@127.0.0.1:8080", "holds a user name or password"),
    ],
)
def test_a_url_that_cannot_be_used_is_a_config_error(tmp_path: Path, url: str, words: str) -> None:
    """They raised ValueError or httpx.InvalidURL (a traceback), or sent the password as
    Basic auth in place of the token."""
    with pytest.raises(ConfigError, match=words) as caught:
        settings.load({"HOME": str(tmp_path), "SCALEBOX_URL": url}, tmp_path / "none")
    assert "s3cret" not in caught.value.what


def test_config_paths_that_are_not_files_are_said_not_raised(tmp_path: Path) -> None:
    """HOME=/dev/null raised NotADirectoryError; a FIFO waited for a writer for good."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    folder = tmp_path / "folder"
    folder.mkdir()
    for path, words in ((fifo, "not a regular file"), (loop, "cannot read"), (folder, "regular")):
        with pytest.raises(ConfigError, match=words):
            settings.load({"HOME": str(tmp_path)}, path)
        # The environment wins over it, as over a file that cannot be parsed.
        env = {"HOME": str(tmp_path), "SCALEBOX_URL": "http://127.0.0.1:9", "SCALEBOX_TOKEN": "t"}
        assert settings.load(env, path).token == "t"
    found = settings.load({"HOME": "/dev/null"}, tmp_path / "none")
    assert found.url is None
    assert any("a folder on its path is a file" in place for place in found.searched)
