"""The config parser: defaults, overrides and errors that name key and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from scalebox import config
from scalebox.errors import ConfigError

TOKEN = "sb-" + "ab" * 24


def test_defaults_fill_every_key_but_the_token() -> None:
    cfg = config.parse(f"API_TOKEN={TOKEN}\nHOST_IP=10.0.0.5\n", "cfg", {})
    assert cfg.api_port == 8080
    assert cfg.data_dir == Path("/var/lib/scalebox")
    assert cfg.kernel_path == Path("/var/lib/scalebox/kernel/vmlinux")
    assert cfg.host_ip == "10.0.0.5"
    assert cfg.warnings == ()


def test_environment_overrides_file_like_environmentfile() -> None:
    cfg = config.parse(f"API_TOKEN={TOKEN}\nAPI_PORT=9000\n", "cfg", {"API_PORT": "9100"})
    assert cfg.api_port == 9100


def test_kernel_path_default_follows_data_dir() -> None:
    cfg = config.parse(f"API_TOKEN={TOKEN}\nDATA_DIR=/srv/sb\n", "cfg", {})
    assert cfg.kernel_path == Path("/srv/sb/kernel/vmlinux")


def test_bad_value_names_key_and_line() -> None:
    with pytest.raises(ConfigError, match=r"cfg line 2: API_PORT='eighty'"):
        config.parse(f"API_TOKEN={TOKEN}\nAPI_PORT=eighty\n", "cfg", {})


def test_missing_token_is_an_error() -> None:
    with pytest.raises(ConfigError, match="API_TOKEN is not set"):
        config.parse("API_PORT=8080\n", "cfg", {})


def test_unknown_key_warns_and_missing_host_ip_warns() -> None:
    cfg = config.parse(f"API_TOKEN={TOKEN}\nAPI_PROT=1\n", "cfg", {})
    assert any("unknown key API_PROT" in w and "line 2" in w for w in cfg.warnings)
    assert any("HOST_IP is not set" in w for w in cfg.warnings)


def test_quoted_values_and_comments() -> None:
    text = f"# comment\nAPI_TOKEN=\"{TOKEN}\"\n\nVM_DOMAIN='vms.example.com'\n"
    cfg = config.parse(text, "cfg", {})
    assert cfg.api_token == TOKEN
    assert cfg.vm_domain == "vms.example.com"


def test_port_range_must_be_ordered() -> None:
    with pytest.raises(ConfigError, match="PORT_MIN"):
        config.parse(f"API_TOKEN={TOKEN}\nPORT_MIN=30000\nPORT_MAX=25000\n", "cfg", {})


def test_garbage_line_is_an_error() -> None:
    with pytest.raises(ConfigError, match="line 1: expected KEY=VALUE"):
        config.parse("this is not config\n", "cfg", {})
