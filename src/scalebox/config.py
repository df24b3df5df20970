"""The server config, /etc/scaleboxd/config: KEY=VALUE lines.

The daemon reads it as systemd's EnvironmentFile would: values in the
process environment override the file. Every key has a default except
API_TOKEN, so a config written by an older release keeps working (see
docs/compatibility.md). Parsing is pure: ``parse`` takes text and an
environment and returns a ServerConfig or raises ConfigError naming the key
and the line.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from scalebox.errors import ConfigError

DEFAULT_PATH = Path("/etc/scaleboxd/config")


@dataclass(frozen=True)
class ServerConfig:
    api_token: str
    api_port: int = 8080
    data_dir: Path = Path("/var/lib/scalebox")
    kernel_path: Path = Path("/var/lib/scalebox/kernel/vmlinux")
    port_min: int = 22001
    port_max: int = 32000
    default_vcpu_count: int = 2
    default_mem_size_mib: int = 2048
    default_disk_size_gib: int = 2
    max_disk_size_gib: int = 100
    api_domain: str = ""
    vm_domain: str = ""
    acme_staging: bool = False
    host_ip: str = "127.0.0.1"
    vm_backend: str = "nspawn"
    vm_network: str = "10.187.0.0/16"
    vm_pids_max: int = 4096
    warnings: tuple[str, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class _Key:
    attr: str
    convert: Callable[[str], object]
    default: str | None  # None: required


def _int_in(lo: int, hi: int) -> Callable[[str], object]:
    def convert(raw: str) -> object:
        try:
            value = int(raw, 10)
        except ValueError:
            raise ValueError(f"expected a whole number from {lo} to {hi}") from None
        if not lo <= value <= hi:
            raise ValueError(f"expected a whole number from {lo} to {hi}")
        return value

    return convert


def _abs_path(raw: str) -> object:
    if not raw.startswith("/"):
        raise ValueError("expected an absolute path")
    return Path(raw)


def _bool(raw: str) -> object:
    lowered = raw.lower()
    if lowered in {"true", "1", "yes", "on"}:
        return True
    if lowered in {"false", "0", "no", "off", ""}:
        return False
    raise ValueError("expected true or false")


def _token(raw: str) -> object:
    if len(raw) < 16 or any(c.isspace() for c in raw):
        raise ValueError("expected at least 16 characters and no spaces")
    return raw


def _domain(raw: str) -> object:
    if raw and (" " in raw or "/" in raw):
        raise ValueError("expected a domain name such as vms.example.com")
    return raw


def _ip(raw: str) -> object:
    try:
        return str(ipaddress.ip_address(raw))
    except ValueError:
        raise ValueError("expected an IP address such as 203.0.113.7") from None


BACKENDS = ("process", "nspawn")


def _backend(raw: str) -> object:
    if raw not in BACKENDS:
        raise ValueError(
            "expected 'nspawn' (containers you ssh into) or 'process' (stand-ins for fast "
            "API tests only)"
        )
    return raw


def _vm_network(raw: str) -> object:
    try:
        network = ipaddress.IPv4Network(raw, strict=True)
    except ValueError:
        raise ValueError("expected an IPv4 network such as 10.187.0.0/16") from None
    if not 8 <= network.prefixlen <= 28:
        raise ValueError("expected a prefix length from /8 to /28 (each VM takes a /30)")
    return str(network)


KEYS: dict[str, _Key] = {
    "API_TOKEN": _Key("api_token", _token, None),
    "API_PORT": _Key("api_port", _int_in(1, 65535), "8080"),
    "DATA_DIR": _Key("data_dir", _abs_path, "/var/lib/scalebox"),
    "KERNEL_PATH": _Key("kernel_path", _abs_path, "$DATA_DIR/kernel/vmlinux"),
    "PORT_MIN": _Key("port_min", _int_in(1024, 65535), "22001"),
    "PORT_MAX": _Key("port_max", _int_in(1024, 65535), "32000"),
    "DEFAULT_VCPU_COUNT": _Key("default_vcpu_count", _int_in(1, 256), "2"),
    "DEFAULT_MEM_SIZE_MIB": _Key("default_mem_size_mib", _int_in(64, 1048576), "2048"),
    "DEFAULT_DISK_SIZE_GIB": _Key("default_disk_size_gib", _int_in(1, 65536), "2"),
    "MAX_DISK_SIZE_GIB": _Key("max_disk_size_gib", _int_in(1, 65536), "100"),
    "API_DOMAIN": _Key("api_domain", _domain, ""),
    "VM_DOMAIN": _Key("vm_domain", _domain, ""),
    "ACME_STAGING": _Key("acme_staging", _bool, "false"),
    "HOST_IP": _Key("host_ip", _ip, None),  # default detected, see _detect_host_ip
    # nspawn: real containers. process: stand-in guests that only answer one JSON
    # line, for fast rootless API tests (and 0.1.0 installs, pinned by migration 0001).
    "VM_BACKEND": _Key("vm_backend", _backend, "nspawn"),
    # nspawn: each VM gets a /30 of this network (host side .1, VM .2).
    "VM_NETWORK": _Key("vm_network", _vm_network, "10.187.0.0/16"),
    "VM_PIDS_MAX": _Key("vm_pids_max", _int_in(16, 4194304), "4096"),
}


def _unquote(raw: str) -> str:
    raw = raw.strip()
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'":
        return raw[1:-1]
    return raw


def parse_lines(text: str, source: str) -> dict[str, tuple[str, str]]:
    """Return KEY -> (value, where) for each assignment; ``where`` is 'SOURCE line N'."""
    values: dict[str, tuple[str, str]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", ";")):
            continue
        key, sep, value = stripped.partition("=")
        key = key.strip()
        if key.startswith("export "):
            key = key[len("export ") :].strip()
        if not sep or not key.replace("_", "").isalnum():
            raise ConfigError(
                f"{source} line {number}: expected KEY=VALUE, found {stripped[:60]!r}",
                "fix or remove that line; comments start with #",
            )
        values[key] = (_unquote(value), f"{source} line {number}")
    return values


def _detect_host_ip() -> str:
    """The address this host uses to reach the outside; no packet is sent (UDP connect)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: routing lookup only, nothing is sent
            return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"


def parse(text: str, source: str, environ: Mapping[str, str]) -> ServerConfig:
    """Build a ServerConfig from config text, with ``environ`` overriding the file."""
    found = parse_lines(text, source)
    for key in KEYS:
        if key in environ:
            found[key] = (environ[key], f"environment variable {key}")
    warnings = [
        f"{where}: unknown key {key} is ignored (check its spelling)"
        for key, (_, where) in sorted(found.items())
        if key not in KEYS and not where.startswith("environment")
    ]
    if "API_TOKEN" not in found or not found["API_TOKEN"][0]:
        raise ConfigError(
            f"{source}: API_TOKEN is not set",
            "add a line API_TOKEN=sb-<48 hex digits>; install.sh generates one",
        )
    kwargs: dict[str, object] = {}
    for key, spec in KEYS.items():
        raw, where = found.get(key, (spec.default, "default"))
        if raw is None:  # HOST_IP, the one key whose default is detected
            raw, where = _detect_host_ip(), "detected"
            warnings.append(f"HOST_IP is not set; using the detected address {raw}")
        if "$DATA_DIR" in raw:
            raw = raw.replace("$DATA_DIR", found.get("DATA_DIR", ("/var/lib/scalebox", ""))[0])
        try:
            kwargs[spec.attr] = spec.convert(raw)
        except ValueError as exc:
            raise ConfigError(
                f"{where}: {key}={raw!r}: {exc}", f"correct {key} in {source} or remove it"
            ) from None
    config = ServerConfig(**kwargs, warnings=tuple(warnings))  # type: ignore[arg-type]
    if config.port_min >= config.port_max:
        raise ConfigError(
            f"{source}: PORT_MIN ({config.port_min}) must be below PORT_MAX ({config.port_max})",
            "widen the range so VMs can get ssh ports",
        )
    if config.default_disk_size_gib > config.max_disk_size_gib:
        raise ConfigError(
            f"{source}: DEFAULT_DISK_SIZE_GIB ({config.default_disk_size_gib}) is above "
            f"MAX_DISK_SIZE_GIB ({config.max_disk_size_gib})",
            "lower DEFAULT_DISK_SIZE_GIB or raise MAX_DISK_SIZE_GIB",
        )
    return config


def load(path: Path, environ: Mapping[str, str]) -> ServerConfig:
    """Read and parse the config at ``path``; a missing file is a ConfigError."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} does not exist",
            "run install.sh, or pass --config PATH to a file with API_TOKEN=...",
        ) from None
    except PermissionError:
        raise ConfigError(
            f"cannot read config file {path}: permission denied", "run as root"
        ) from None
    return parse(text, str(path), environ)
