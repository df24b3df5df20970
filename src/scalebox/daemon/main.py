"""scaleboxd: the API daemon's entry point.

    scaleboxd [--config PATH] [--bind HOST]   run the API
    scaleboxd --handover [--config PATH]      serve beside the main daemon during an update
    scaleboxd --check-config [PATH]           validate the config and exit
    scaleboxd --version                       print the version /health reports
    scaleboxd --config PATH --run-guest ID    the guest program of one VM

Exit codes: 0 ok, 1 failure (see the log), 2 invalid config or usage.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import NoReturn

import scalebox
from scalebox import config as config_module
from scalebox import priority
from scalebox.config import ServerConfig
from scalebox.daemon import systemd
from scalebox.errors import ConfigError, ScaleboxError

log = logging.getLogger("scaleboxd")

# Below systemd's TimeoutStopSec=30, so state is saved before a SIGKILL.
EXIT_FAILURE = 1
EXIT_CONFIG = 2  # invalid config or usage (argparse exits 2 too)
GRACEFUL_SHUTDOWN_SECONDS = 20


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scaleboxd",
        description="The Scalebox API daemon. Exit codes: 0 ok, 1 failure, 2 invalid config.",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=config_module.DEFAULT_PATH,
        help=f"config file (default {config_module.DEFAULT_PATH})",
    )
    parser.add_argument(
        "--check-config",
        nargs="?",
        const="",
        metavar="PATH",
        help="validate the config (PATH, else --config) and exit: 0 valid, 2 invalid",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument(
        "--bind",
        default="0.0.0.0",
        metavar="HOST",
        help="address to listen on when not socket-activated (default 0.0.0.0)",
    )
    parser.add_argument(
        "--handover",
        action="store_true",
        help="serve on systemd's socket beside the main daemon while it restarts during an "
        "update (scaleboxd-handover.service): never changes VMs, answers changes with 503",
    )
    parser.add_argument("--run-guest", metavar="VM_ID", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def setup_logging() -> None:
    """One line per event on stderr; under systemd journald adds time and unit."""
    under_journald = bool(os.environ.get("JOURNAL_STREAM"))
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not under_journald:
        fmt = "%(asctime)s " + fmt
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def check_config(path: Path) -> int:
    try:
        config = config_module.load(path, os.environ)
    except ConfigError as exc:
        print(f"scaleboxd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"config OK: {path}")
    for warning in config.warnings:
        print(f"warning: {warning}")
    return 0


def load_config(path: Path) -> ServerConfig:
    config = config_module.load(path, os.environ)
    for warning in config.warnings:
        log.warning("%s", warning)
    return config


def listening_socket(bind: str, port: int) -> socket.socket:
    sock = systemd.take_activation_socket(os.environ, os.getpid())
    if sock is not None:
        log.info("using the listening socket passed by systemd (%s)", _address(sock))
        actual_port = sock.getsockname()[1] if sock.family != socket.AF_UNIX else None
        if actual_port is not None and actual_port != port:
            log.warning(
                "API_PORT is %d but systemd passed a socket on port %d; scaleboxd.socket "
                "decides the port (change its ListenStream= with a drop-in)",
                port,
                actual_port,
            )
        return sock
    try:
        sock = systemd.bind_socket(bind, port)
    except OSError as exc:
        raise ScaleboxError(
            f"cannot listen on {bind}:{port}: {exc.strerror}",
            "stop whatever uses the port, or set API_PORT in the config",
        ) from None
    log.info("listening on %s", _address(sock))
    return sock


def _address(sock: socket.socket) -> str:
    name = sock.getsockname()
    if isinstance(name, str | bytes):  # a unix socket
        return str(name)
    return f"{name[0]}:{name[1]}"


def freeze_heap() -> None:
    """Exempt every object made so far from collections, and collect again from now on.

    What imports and startup made (~50,000 objects: FastAPI, pydantic, uvicorn)
    lives as long as the process. A full collection walks all of it and stops
    the event loop for 20-30 ms on a 2-core server, a pause every request in
    flight then waits out; once frozen (gc.freeze) a collection walks only
    what came later. Done before serving, so no request waits for this.
    Frozen without a collection first: serve() starts with collections off,
    and a start's garbage is a few hundred objects (see there). Nothing here
    counts them: gc.get_freeze_count() walks all of them (6-15 ms).
    """
    gc.freeze()
    gc.enable()


def serve(config: ServerConfig, config_path: Path, bind: str, *, handover: bool = False) -> int:
    # The entry point (daemon/entry.py) lowered the process if another daemon serves;
    # the server restores it at READY=1.
    if priority.lowered():
        log.info("another scaleboxd serves: starting at a lower CPU priority until ready")
    # No garbage collection until freeze_heap(), just before serving. A start's
    # imports make ~50,000 objects that live as long as the process, and the
    # collector walked them again and again as they came: 140 collections, two
    # of them full, 140 ms of a 840 ms start (the CPU that competes with the
    # daemon serving during an update), for fewer than 1,000 objects freed.
    gc.disable()
    # Imported here, not at the top: `scaleboxd --run-guest` (each VM's unit) must
    # exec systemd-nspawn without paying for uvicorn, starlette and fastapi.
    import uvicorn  # noqa: PLC0415

    from scalebox.daemon.app import create_app  # noqa: PLC0415  (fastapi import is slow)
    from scalebox.daemon.httpserver import (  # noqa: PLC0415
        CloseWhenDraining,
        RequestDeadline,
        Server,
        warm_up,
    )
    from scalebox.daemon.serving import Serving  # noqa: PLC0415
    from scalebox.daemon.vms.service import VMService  # noqa: PLC0415

    # A signal before uvicorn takes over (while VMs are reconciled) must still
    # end in a clean stop with state saved.
    stop_requested: list[int] = []

    def early_stop(signum: int, _frame: FrameType | None) -> None:
        stop_requested.append(signum)

    signal.signal(signal.SIGTERM, early_stop)
    signal.signal(signal.SIGINT, early_stop)

    # Listen first: with socket activation connections already queue in the
    # kernel, and without it clients get queued instead of refused while VMs
    # are reconciled.
    sock = listening_socket(bind, config.api_port)
    # The handover instance shares DATA_DIR with the main daemon: it only reads.
    service = VMService(config, log.getChild("vms"), read_only=handover)
    # No close() when start() fails: the state may not be loaded yet, and
    # saving it would overwrite the real one with an empty list of VMs.
    service.start()
    try:
        if stop_requested:
            log.info("stopping before serving: received signal %d", stop_requested[0])
            systemd.notify("STOPPING=1")
            return 0
        service.boot_stopped()  # VMs found stopped boot while the API serves
        draining = threading.Event()
        app = CloseWhenDraining(create_app(config, service, log.getChild("api")), draining)
        uv_config = uvicorn.Config(
            app,
            # Named, not "auto": uvloop and httptools were measured and left out
            # (docs/architecture.md); httptools would hold a request head of any size.
            loop="asyncio",
            http=RequestDeadline,  # h11, with a deadline for each request
            log_config=None,
            access_log=False,  # AccessLogMiddleware logs the path only, never headers
            lifespan="off",
            proxy_headers=False,
            server_header=False,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        )
        warm_up(app, config.api_token)
        uv_config.load()  # uvicorn's own imports, done here so that they are frozen too
        freeze_heap()
        serving = Serving(str(config_path))
        Server(uv_config, stop_requested, draining, serving, handover=handover).run(sockets=[sock])
    finally:
        try:
            _give_way_once_stopped(config_path)
        except Exception as exc:  # noqa: BLE001 - the state is saved whatever happened here
            log.warning("could not lower the CPU priority to exit (%s); going on", exc)
        service.close()
        log.info("state saved; scaleboxd %s exits", scalebox.__version__)
    return 0


def _give_way_once_stopped(config_path: Path) -> None:
    """What a daemon does once it stops serving (save the state, exit) gives way to a
    daemon serving beside it: in an update, the old main daemon's exit beside the
    handover instance, the handover instance's (at its unit's Nice=-5) beside the new
    main daemon. At the daemon's priority they set requests of 7-11 ms against 4 ms
    with no update. Only a daemon that leads its session lowers it (by then nothing
    else of ours runs in it: VMs have sessions, or units, of their own)."""
    from scalebox.daemon import serving  # noqa: PLC0415
    from scalebox.daemon.entry import GIVE_WAY_SECONDS  # noqa: PLC0415

    if os.getsid(0) != os.getpid() or not serving.others_serve(str(config_path)):
        return
    priority.lower_process(log.warning, priority.Session.OWN, at_most=GIVE_WAY_SECONDS)
    log.info(
        "another scaleboxd serves: saving the state and exiting at nice %d (session %s)",
        os.getpriority(os.PRIO_PROCESS, 0),
        priority.session_nice(),
    )


def exit_now(code: int) -> NoReturn:
    """End a daemon that has stopped serving without the interpreter's teardown.

    Freeing a start's ~50,000 objects one by one took ~6 ms of CPU of the ~14 ms
    from SIGTERM to exit (measured with and without), twice per update beside the
    daemon serving. What an exit must still do is done here: wait for the threads
    that are not daemon threads (as the interpreter does), flush logging's handlers
    and the standard streams.
    """
    current = threading.current_thread()
    for thread in threading.enumerate():
        if thread is not current and not thread.daemon:
            thread.join()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def run_guest(config_path: Path, vm_id: str) -> int:
    from scalebox.daemon.vms import guest  # noqa: PLC0415

    config = config_module.load(config_path, os.environ)
    return guest.run(config, vm_id)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.version or args.check_config is not None or args.run_guest is not None:
        # Lowered by the entry point only to serve: a VM never runs lowered.
        priority.restore_process(lambda message: print(f"scaleboxd: {message}", file=sys.stderr))
    if args.version:
        print(scalebox.__version__)
        return 0
    if args.check_config is not None:
        return check_config(Path(args.check_config) if args.check_config else args.config)
    setup_logging()
    try:
        if args.run_guest is not None:
            return run_guest(args.config, args.run_guest)
        log.info("scaleboxd %s starting with config %s", scalebox.__version__, args.config)
        exit_now(serve(load_config(args.config), args.config, args.bind, handover=args.handover))
    except ScaleboxError as exc:
        log.error("%s", exc)  # noqa: TRY400  (a ScaleboxError is for people; no traceback)
        return EXIT_CONFIG if isinstance(exc, ConfigError) else EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
