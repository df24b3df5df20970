"""scalebox: the user CLI of a Scalebox server.

The one top-level handler is ScaleboxGroup.invoke: a ScaleboxError becomes a
single line on stderr and its exit code (see scalebox.cli.errors); any other
exception keeps its traceback, because it is a bug.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import shlex
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from scalebox import __version__, fsutil, names
from scalebox.cli import output, settings
from scalebox.cli.client import Client, Json
from scalebox.cli.errors import EXIT_CODES_HELP, EXIT_INTERRUPTED, ApiError, exit_code_for
from scalebox.cli.sshkey import choose_public_key
from scalebox.errors import ConfigError, ScaleboxError, UsageError

F = TypeVar("F", bound=Callable[..., Any])

EPILOG = (
    "\b\nConfiguration, first found wins:\n"
    "  environment: SCALEBOX_URL, SCALEBOX_TOKEN\n"
    "  $XDG_CONFIG_HOME/scalebox/config (default ~/.config/scalebox/config)\n"
    "  /etc/scalebox/config\n"
    "Files hold KEY=VALUE lines; `scalebox login` writes the user file.\n"
    "\n\b\nExit codes:\n" + "\n".join(f"  {code}  {meaning}" for code, meaning in EXIT_CODES_HELP)
)


class ReportedError(click.ClickException):
    """A ScaleboxError on its way out: one line on stderr, the error's exit code."""

    def __init__(self, error: ScaleboxError) -> None:
        what = error.what.rstrip(".")
        super().__init__(f"{what}; {error.hint}" if error.hint else what)
        # click declares exit_code a ClassVar but reads it from the instance it catches.
        self.exit_code = exit_code_for(error)  # type: ignore[misc]

    def show(self, file: Any = None) -> None:
        click.echo(f"scalebox: error: {self.message}", err=True)


class ScaleboxGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ScaleboxError as exc:
            raise ReportedError(exc) from exc
        except KeyboardInterrupt:
            # click would print "Aborted!" and exit 1, which means "API error" here.
            click.echo("scalebox: interrupted", err=True)
            raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
        except click.exceptions.Abort as exc:
            # A prompt's own Abort: Ctrl-C (interrupted) or the end of its input.
            if isinstance(exc.__context__, KeyboardInterrupt):
                click.echo("scalebox: interrupted", err=True)
                raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
            raise ReportedError(
                UsageError(
                    "no answer to the prompt (its input ended)",
                    "pass the value as an option, e.g. `scalebox login --url URL --token-stdin`",
                )
            ) from None


def json_option(func: F) -> F:
    return click.option(
        "--json", "as_json", is_flag=True, help="Print the API's JSON instead of text."
    )(func)


def warn(message: str) -> None:
    click.echo(f"scalebox: warning: {message}", err=True)


def current_settings() -> settings.Settings:
    found = settings.load()
    for message in found.warnings:
        warn(message)
    return found


def connect(*, auth: bool = True) -> Client:
    found = current_settings()
    url = found.require_url()
    if not auth:
        return Client(url)
    return Client(url, found.require_token(), token_source=found.token_source)


# The API's rules (scalebox.names) are checked here too, so that a bad name is
# refused before anything is sent.


def listed(answer: Json, key: str) -> list[Json]:
    """``answer[key]``, a list of objects, as scaleboxd sends it; a clear error otherwise
    (a list of strings made the table raise a traceback)."""
    items = answer.get(key) or []
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise ApiError(
            f"the server's answer has no list of objects under '{key}'",
            "check that the URL (SCALEBOX_URL) points at scaleboxd",
        )
    return items


def check_vm_ref(value: str) -> str:
    if (problem := names.vm_ref_problem(value)) is not None:
        raise UsageError(problem, "`scalebox vm list` shows the VMs")
    return value


def check_vm_name(value: str, option: str) -> str:
    if (problem := names.vm_name_problem(value, f"{option} (VM name)")) is not None:
        raise UsageError(problem, "or leave it out and the server picks a name")
    return value


def check_template_name(value: str, option: str) -> str:
    if (problem := names.template_name_problem(value, f"{option} (template name)")) is not None:
        raise UsageError(problem, "`scalebox template list` shows the templates")
    return value


@click.group(
    cls=ScaleboxGroup, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]}
)
@click.version_option(__version__, prog_name="scalebox")
def cli() -> None:
    """Create and manage sandbox VMs on a Scalebox server."""


# -- status ----------------------------------------------------------------


@cli.command()
@json_option
def status(as_json: bool) -> None:
    """Show whether the server is up, its version and its resources."""
    with connect(auth=False) as client:
        health = client.health()
        info = client.info()
        url = client.url
    if as_json:
        output.print_json({"health": health, "info": info})
        return
    storage = info.get("storage") or {}
    memory = info.get("memory") or {}
    output.print_fields(
        [
            ("server", url),
            ("status", output.text(health.get("status"))),
            ("version", output.text(health.get("version"))),
            ("host ip", output.text(info.get("host_ip"))),
            ("vms", output.text(info.get("vms_count"))),
            ("templates", output.text(info.get("templates_count"))),
            (
                "storage",
                f"{output.text(storage.get('free_gb'))} GB free of "
                f"{output.text(storage.get('total_gb'))} GB",
            ),
            (
                "memory",
                f"{output.text(memory.get('free_gb'))} GB free of "
                f"{output.text(memory.get('total_gb'))} GB",
            ),
            ("cpu", f"{output.text(info.get('cpu_percent'))} %"),
        ]
    )


# -- vm --------------------------------------------------------------------


@cli.group()
def vm() -> None:
    """Create, list, inspect, snapshot and delete VMs."""


VM_HEADERS = ("ID", "NAME", "TEMPLATE", "STATUS", "SSH", "CREATED")


def vm_row(item: Json) -> list[str]:
    cells = [output.text(item.get(key)) for key in ("id", "name", "template", "status", "ssh")]
    return [*cells, output.timestamp(item.get("created_at"))]


def print_vm(item: Json) -> None:
    output.print_fields(
        [
            ("id", output.text(item.get("id"))),
            ("name", output.text(item.get("name"))),
            ("template", output.text(item.get("template"))),
            ("status", output.text(item.get("status"))),
            ("ip", output.text(item.get("ip"))),
            ("ssh port", output.text(item.get("ssh_port"))),
            ("ssh", output.text(item.get("ssh"))),
            ("url", output.text(item.get("url"))),
            ("created", output.timestamp(item.get("created_at"))),
        ]
    )


@vm.command("list")
@json_option
def vm_list(as_json: bool) -> None:
    """List the VMs."""
    with connect() as client:
        answer = client.list_vms()
    if as_json:
        output.print_json(answer)
        return
    vms = listed(answer, "vms")
    if not vms:
        click.echo("No VMs. Create one with `scalebox vm create`.")
        return
    output.print_table(VM_HEADERS, [vm_row(item) for item in vms])


@vm.command("get")
@click.argument("vm_ref", metavar="VM")
@json_option
def vm_get(vm_ref: str, as_json: bool) -> None:
    """Show one VM, by id or name."""
    check_vm_ref(vm_ref)
    with connect() as client:
        answer = client.get_vm(vm_ref)
    if as_json:
        output.print_json(answer)
    else:
        print_vm(answer)


@vm.command("create")
@click.option(
    "-t", "--template", default="debian-base", show_default=True, help="Template to copy."
)
@click.option(
    "--ssh-key",
    "ssh_key_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Public key file the VM accepts [default: ~/.ssh/id_ed25519.pub or id_rsa.pub].",
)
@click.option("--ssh-public-key", "ssh_key_text", help="The public key itself, instead of a file.")
@click.option(
    "-k",
    "--key",
    "key_arg",
    metavar="KEY|@FILE",
    help="The public key itself, or @FILE to read it from FILE, as upstream's client does.",
)
@click.option("-n", "--name", help="VM name [default: the server picks one].")
@click.option("--vcpu", type=click.IntRange(min=1), help="Virtual CPUs [default: the server's].")
@click.option(
    "-m", "--mem", type=click.IntRange(min=1), help="Memory in MiB [default: the server's]."
)
@click.option(
    "-d", "--disk", type=click.IntRange(min=1), help="Disk in GiB [default: the server's]."
)
@json_option
def vm_create(
    *,
    template: str,
    ssh_key_file: Path | None,
    ssh_key_text: str | None,
    key_arg: str | None,
    name: str | None,
    vcpu: int | None,
    mem: int | None,
    disk: int | None,
    as_json: bool,
) -> None:
    """Create a VM from a template and print how to reach it."""
    check_template_name(template, "--template")
    if name is not None:
        check_vm_name(name, "--name")
    key = choose_public_key(ssh_key_file, ssh_key_text, Path.home() / ".ssh", key_arg=key_arg)
    body: Json = {"template": template, "ssh_public_key": key}
    optional = {"name": name, "vcpu_count": vcpu, "mem_size_mib": mem, "disk_size_gib": disk}
    body.update({field: value for field, value in optional.items() if value is not None})
    with connect() as client:
        answer = client.create_vm(body)
    if as_json:
        output.print_json(answer)
        return
    name, vm_id = output.text(answer.get("name")), output.text(answer.get("id"))
    click.echo(f"Created VM {name} ({vm_id}). Connect with:")
    click.echo(f"  {output.text(answer.get('ssh'))}")
    print_vm(answer)


@vm.command("delete")
@click.argument("vm_ref", metavar="VM")
@json_option
def vm_delete(vm_ref: str, as_json: bool) -> None:
    """Delete a VM and its disk, by id or name."""
    check_vm_ref(vm_ref)
    with connect() as client:
        client.delete_vm(vm_ref)
    if as_json:
        # The API answers 204 with no body; say what happened in JSON all the same.
        output.print_json({"deleted": vm_ref, "message": f"Deleted VM {vm_ref}"})
    else:
        click.echo(f"Deleted VM {vm_ref}.")


@vm.command("snapshot")
@click.argument("vm_ref", metavar="VM")
@click.argument("template_name", metavar="[TEMPLATE_NAME]", required=False)
@click.option(
    "-n", "--name", "name_option", metavar="TEMPLATE_NAME", help="Name of the new template."
)
@json_option
def vm_snapshot(
    vm_ref: str, template_name: str | None, name_option: str | None, as_json: bool
) -> None:
    """Copy a VM's disk into a new template named TEMPLATE_NAME (or -n TEMPLATE_NAME)."""
    check_vm_ref(vm_ref)
    if template_name is not None and name_option is not None:
        raise UsageError(
            "the template name was given twice (TEMPLATE_NAME and -n)", "pass only one of them"
        )
    chosen = template_name if template_name is not None else name_option
    if chosen is None:
        raise UsageError(
            "no template name given", "pass it: `scalebox vm snapshot VM -n TEMPLATE_NAME`"
        )
    check_template_name(chosen, "TEMPLATE_NAME")
    with connect() as client:
        answer = client.snapshot_vm(vm_ref, chosen)
    if as_json:
        output.print_json(answer)
        return
    click.echo(
        f"Saved VM {vm_ref} as template {output.text(answer.get('template'))} "
        f"({output.size(answer.get('size_bytes'))})."
    )


SSH_USER = "user"  # the account every template has (docs/architecture.md)


def ssh_argv(
    vm: Json, identity: Path | None, options: tuple[str, ...], command: tuple[str, ...]
) -> list[str]:
    """The ssh command line into ``vm`` (a VM as the API shows it) that runs ``command``."""
    port, host = vm.get("ssh_port"), vm.get("ip")
    label = output.text(vm.get("name") or vm.get("id"))
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise ApiError(
            f"VM {label} has no SSH port", "`scalebox vm get` shows what the server says"
        )
    try:
        # An address and nothing else: "evil@host" chose the login user, "a b" an argument.
        host = str(ipaddress.ip_address(host)) if isinstance(host, str) else None
    except ValueError:
        host = None
    if host is None:
        raise ApiError(
            f"VM {label} has no valid address (ip)", "set HOST_IP in the server's config"
        )
    argv = ["ssh", "-p", str(port)]
    if identity is not None:
        argv += ["-i", str(identity)]
    for option in options:
        argv += ["-o", option]
    # `--`: the destination and the command are never read as ssh options.
    return [*argv, "--", f"{SSH_USER}@{host}", *command]


def _is_own_ssh_option(word: str) -> bool:
    """Whether ``word`` is one of `vm ssh`'s own options (-i, -o, --print and long forms)."""
    if word in {"-i", "-o", "--identity", "--ssh-option", "--print"}:
        return True
    glued = word[:2] in {"-i", "-o"} and not word.startswith("--")  # -i~/.ssh/k, -oOpt=1
    return glued or word.startswith(("--identity=", "--ssh-option="))


@vm.command(
    "ssh",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.argument("vm_ref", metavar="VM")
@click.argument("command", nargs=-1, type=click.UNPROCESSED, metavar="[-- CMD...]")
@click.option(
    "-i", "--identity", type=click.Path(dir_okay=False, path_type=Path),
    help="Private key file for ssh (ssh -i) [default: ssh's own choice].",
)  # fmt: skip
@click.option(
    "-o", "--ssh-option", "options", multiple=True, metavar="OPTION",
    help="An option for ssh (ssh -o OPTION); may be repeated.",
)  # fmt: skip
@click.option(
    "--print", "print_only", is_flag=True,
    help="Print the ssh command line instead of running it.",
)  # fmt: skip
def vm_ssh(
    vm_ref: str,
    command: tuple[str, ...],
    identity: Path | None,
    options: tuple[str, ...],
    print_only: bool,
) -> None:
    """Log into a VM with ssh as `user`, or run CMD in it; exits with ssh's exit code."""
    check_vm_ref(vm_ref)
    if command[:1] == ("--",):  # click keeps the `--` that follows VM: it is ours, not CMD's
        command = command[1:]
    elif command and _is_own_ssh_option(command[0]):
        # Everything after VM is the VM's command: `vm ssh box --print` would have run
        # ssh with "--print" as the command, not printed the line.
        raise UsageError(
            f"{command[0]} comes after VM, where it would be sent to the VM as its command",
            f"put the options before VM (`scalebox vm ssh {command[0]} ... {vm_ref}`); to run "
            "a command that begins with it, put -- before the command",
        )
    with connect() as client:
        answer = client.get_vm(vm_ref)
    argv = ssh_argv(answer, identity, options, command)
    if print_only:
        click.echo(shlex.join(argv))
        return
    program = shutil.which("ssh")
    if program is None:
        raise UsageError(
            "ssh is not installed (no ssh on PATH)",
            "install the OpenSSH client (apt-get install openssh-client), "
            "or print the command with --print",
        )
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(program, argv)  # noqa: S606 - argv is ours, no shell involved


# -- template --------------------------------------------------------------


@cli.group()
def template() -> None:
    """List and delete templates (VMs are created from them)."""


@template.command("list")
@json_option
def template_list(as_json: bool) -> None:
    """List the templates."""
    with connect() as client:
        answer = client.list_templates()
    if as_json:
        output.print_json(answer)
        return
    templates = listed(answer, "templates")
    if not templates:
        click.echo("No templates.")
        return
    rows = [
        [
            output.text(t.get("name")),
            output.size(t.get("size_bytes")),
            output.timestamp(t.get("created_at")),
        ]
        for t in templates
    ]
    output.print_table(("NAME", "SIZE", "CREATED"), rows)


@template.command("delete")
@click.argument("name")
@json_option
def template_delete(name: str, as_json: bool) -> None:
    """Delete a template. debian-base is protected."""
    check_template_name(name, "NAME")
    with connect() as client:
        client.delete_template(name)
    if as_json:
        output.print_json({"deleted": name, "message": f"Deleted template {name}"})
    else:
        click.echo(f"Deleted template {name}.")


# -- login -----------------------------------------------------------------


@cli.command()
@click.option(
    "--url",
    "--host",
    "url",
    help="Server URL, e.g. http://203.0.113.7:8080 (prompted when missing).",
)
@click.option("--token", help="API token (prompted without echo when missing).")
@click.option(
    "--token-stdin",
    is_flag=True,
    help="Read the API token from the first line of stdin (keeps it out of `ps`).",
)
@json_option
def login(url: str | None, token: str | None, token_stdin: bool, as_json: bool) -> None:
    """Check a server URL and token, then save them in your config file (mode 0600)."""
    path = settings.user_config_path(os.environ)
    if token_stdin:
        if token is not None:
            raise UsageError("--token and --token-stdin were both given", "pass only one of them")
        token = sys.stdin.readline()
        if not token.strip():
            raise UsageError(
                "--token-stdin read no token",
                "pipe the token in: `... | scalebox login --token-stdin`",
            )
    if url is None:
        try:
            default = settings.load().url
        except ConfigError:
            default = None  # a broken old config must not block writing a good one
        url = click.prompt("Server URL", default=default)
    url = settings.normalize_url(url, "--url")
    if token is None:
        token = click.prompt("API token", hide_input=True)
    token = settings.check_token(token.strip(), "--token")
    # Only credentials the server accepts are saved: a bad token changes nothing.
    with Client(url, token, token_source="--token") as client:  # noqa: S106 - a label
        vms = client.list_vms().get("vms") or []
    save_login(path, url, token)
    if as_json:
        output.print_json({"url": url, "config": str(path), "vms_count": len(vms)})
    else:
        click.echo(f"Logged in to {url} ({len(vms)} VMs). Saved to {path}.")
    for key in (settings.URL_KEY, settings.TOKEN_KEY):
        if os.environ.get(key):
            warn(f"{key} is set in your environment and overrides the saved value")


def _write_target(path: Path) -> Path:
    """Where saving ``path`` writes: through a symlink (a dotfiles checkout), not over
    it. realpath, not resolve(): a loop is an OSError here, not a RuntimeError."""
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    if target.is_symlink():  # a loop: realpath stops at it; never written over
        raise OSError(errno.ELOOP, "it is a symlink that leads back to itself")
    return target


def save_login(path: Path, url: str, token: str) -> None:
    text = (
        "# Written by `scalebox login`. KEY=VALUE lines.\n"
        f"{settings.URL_KEY}={url}\n"
        f"{settings.TOKEN_KEY}={token}\n"
    )
    try:
        target = _write_target(path)
        # The directory holds a secret too: create it private (mkdir honours umask too).
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fsutil.atomic_write(target, text, mode=0o600)
    except OSError as exc:  # a read-only or full HOME, a file where a folder should be
        raise ConfigError(
            f"the server accepted the token, but it cannot be saved to {path}: "
            f"{exc.strerror or exc}",
            f"make that folder writable, or set {settings.URL_KEY} and {settings.TOKEN_KEY} "
            "in the environment instead",
        ) from None


def main() -> None:
    cli(prog_name="scalebox")
