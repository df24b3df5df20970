"""Where the CLI finds the server URL and the API token.

Search order, per key: the environment (SCALEBOX_URL, SCALEBOX_TOKEN), then
the user's file ($XDG_CONFIG_HOME/scalebox/config, else
~/.config/scalebox/config), then /etc/scalebox/config. Files hold KEY=VALUE
lines. A token read from a file that also names a *different* URL is not
used: it belongs to that other server, and sending it elsewhere would leak it.

``resolve`` is pure (environment and file texts in, Settings out); reading
the files is the only side effect and lives in ``load``.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from scalebox.config import parse_lines
from scalebox.errors import ConfigError

SYSTEM_PATH = Path("/etc/scalebox/config")
URL_KEY = "SCALEBOX_URL"
TOKEN_KEY = "SCALEBOX_TOKEN"  # noqa: S105 - the variable's name, not a secret
KNOWN_KEYS = (URL_KEY, TOKEN_KEY)


@dataclass(frozen=True)
class ConfigFile:
    """One config file as found on disk: its text, or why it could not be read."""

    path: Path
    text: str | None
    problem: str | None = None  # e.g. "permission denied"; None when missing or read
    # It exists but cannot be read as a config (a directory, a FIFO, a symlink loop, not
    # UTF-8): told like a file that cannot be parsed, when the search needs it.
    error: ConfigError | None = None
    mode: int | None = None  # permission bits of the file read (None when not read)


@dataclass(frozen=True)
class Settings:
    url: str | None
    token: str | None
    url_source: str  # where the URL came from, for messages
    token_source: str
    searched: tuple[str, ...]  # every place looked at, for the "not configured" hint
    warnings: tuple[str, ...] = ()
    token_skipped: str | None = None  # why a token that was found is not used

    def require_url(self) -> str:
        if self.url is None:
            raise ConfigError(
                "no Scalebox server is configured",
                f"run `scalebox login` or set {URL_KEY} (looked in: {', '.join(self.searched)})",
            )
        return self.url

    def require_token(self) -> str:
        if self.token is None:
            why = f" ({self.token_skipped})" if self.token_skipped else ""
            raise ConfigError(
                f"no API token is configured{why}", f"run `scalebox login` or set {TOKEN_KEY}"
            )
        return self.token


def user_config_path(environ: Mapping[str, str]) -> Path:
    """The user's config file, honouring XDG_CONFIG_HOME and HOME."""
    xdg = environ.get("XDG_CONFIG_HOME", "")
    # The XDG spec says a relative XDG_CONFIG_HOME is invalid and must be ignored.
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "scalebox" / "config"
    home = environ.get("HOME") or str(Path.home())
    return Path(home) / ".config" / "scalebox" / "config"


def normalize_url(raw: str, where: str) -> str:
    """Check that ``raw`` is an http(s) URL with a host; drop a trailing slash."""
    url = raw.strip().rstrip("/")
    form = "use the form http://HOST:PORT or https://HOST, e.g. http://127.0.0.1:8080"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - read for its check: a port that is not a number raises
    except ValueError as exc:  # "http://[::1", "http://host:abc"
        raise ConfigError(f"{where}: {raw!r} is not a server URL ({exc})", form) from None
    if parts.username is not None or parts.password is not None:
        # Not echoed: it may hold a password. httpx would send it as Basic auth in place
        # of the token, and the server would answer "malformed Authorization header".
        raise ConfigError(
            f"{where}: the URL holds a user name or password",
            "remove the 'user:password@' part; the API token is the credential",
        )
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ConfigError(f"{where}: {raw!r} is not a server URL", form)
    if parts.query or parts.fragment:
        raise ConfigError(
            f"{where}: {raw!r} has a query or fragment", "give only scheme, host, port and path"
        )
    return url


def check_token(raw: str, where: str) -> str:
    """A token goes into an HTTP header: it must be printable ASCII without spaces."""
    if not raw or not all(33 <= ord(c) <= 126 for c in raw):
        raise ConfigError(
            f"{where}: the token is empty or contains spaces or non-ASCII characters",
            "copy the token exactly as API_TOKEN in the server's /etc/scaleboxd/config",
        )
    return raw


def resolve(environ: Mapping[str, str], files: Sequence[ConfigFile]) -> Settings:
    """Pick the URL and token from the environment and the files, first one wins."""
    # Each source: KEY -> (value, where). The environment comes first.
    sources: list[dict[str, tuple[str, str]]] = [
        {
            key: (environ[key], f"environment variable {key}")
            for key in KNOWN_KEYS
            if environ.get(key)
        }
    ]
    searched = [f"environment ({URL_KEY}, {TOKEN_KEY})"]
    warnings: list[str] = []
    broken: ConfigError | None = None  # a file that cannot be read ends the search there
    for file in files:
        if file.problem:
            searched.append(f"{file.path} ({file.problem})")
        else:
            searched.append(str(file.path))
        if file.error is not None:
            broken = file.error
            break
        if file.text is None:
            sources.append({})
            continue
        try:
            found = parse_lines(file.text, str(file.path))
        except ConfigError as exc:
            broken = exc
            break
        warnings.extend(
            f"{where}: unknown key {key} is ignored (the keys are {URL_KEY} and {TOKEN_KEY})"
            for key, (_, where) in found.items()
            if key not in KNOWN_KEYS
        )
        sources.append({k: v for k, v in found.items() if k in KNOWN_KEYS and v[0]})

    # First found wins, so a broken file matters only when a key is still missing when
    # the search reaches it: SCALEBOX_URL and SCALEBOX_TOKEN in the environment are
    # enough whatever an admin's typo in /etc/scalebox/config says.
    needed = [key for key in KNOWN_KEYS if not any(key in source for source in sources)]
    if broken is not None and needed:
        raise broken

    url: str | None = None
    url_source = "not set"
    for source in sources:
        if URL_KEY in source:
            raw, url_source = source[URL_KEY]
            url = normalize_url(raw, url_source)
            break

    token: str | None = None
    token_source = "not set"  # noqa: S105 - a label for messages
    token_skipped: str | None = None
    for index, source in enumerate(sources):
        if TOKEN_KEY not in source:
            continue
        raw, where = source[TOKEN_KEY]
        own_url = source.get(URL_KEY)
        is_environment = index == 0
        if not is_environment and own_url and url and normalize_url(*own_url) != url:
            token_skipped = f"the token in {where} is for {own_url[0]}, not {url}"
            continue
        token, token_source = check_token(raw, where), where
        warnings.extend(_open_to_others(files, index))
        break

    return Settings(
        url=url,
        token=token,
        url_source=url_source,
        token_source=token_source,
        searched=tuple(searched),
        warnings=tuple(warnings),
        token_skipped=token_skipped,
    )


def _open_to_others(files: Sequence[ConfigFile], source: int) -> list[str]:
    """A warning if others may read the file the token came from (source 0 is the
    environment, 1 the user's own file, which is theirs alone; a system file may be
    shared with a group)."""
    if source == 0:
        return []
    file = files[source - 1]
    others = 0o077 if source == 1 else 0o007
    if file.mode is None or not file.mode & others:
        return []
    return [
        f"{file.path} holds the API token and other users may read it (mode "
        f"{file.mode:04o}): run `chmod 600 {file.path}`"
    ]


def read_config_file(path: Path) -> ConfigFile:
    """The file as found; never raises (what cannot be read is in ``error``, for resolve
    to tell only if the search needs this file: the environment wins over it)."""
    fix = "make it a text file of KEY=VALUE lines or remove it"
    try:
        if path.exists() and not path.is_file():  # a FIFO would wait for a writer for good
            error = ConfigError(f"cannot read {path}: it is not a regular file", fix)
            return ConfigFile(path, None, "not a regular file", error)
        with path.open(encoding="utf-8") as f:
            return ConfigFile(path, f.read(), mode=stat.S_IMODE(os.fstat(f.fileno()).st_mode))
    except FileNotFoundError:
        return ConfigFile(path, None)
    except NotADirectoryError:  # HOME or XDG_CONFIG_HOME names a file: no config there
        return ConfigFile(path, None, "a folder on its path is a file")
    except PermissionError:
        # /etc/scalebox/config may be readable by root only; the user's own file still counts.
        return ConfigFile(path, None, "permission denied")
    except (OSError, UnicodeDecodeError) as exc:  # a directory, a symlink loop, an I/O error
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return ConfigFile(path, None, reason, ConfigError(f"cannot read {path}: {reason}", fix))


def load(environ: Mapping[str, str] | None = None, system_path: Path = SYSTEM_PATH) -> Settings:
    """Read the settings the way the CLI does, from ``environ`` (default os.environ)."""
    env = os.environ if environ is None else environ
    files = [read_config_file(user_config_path(env)), read_config_file(system_path)]
    return resolve(env, files)
