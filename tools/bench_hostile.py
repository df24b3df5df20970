"""./do bench-hostile: the updater's peak memory on hostile inputs of our own making.

    ./do bench-hostile [--json]

Builds each hostile input in a temporary folder (tarballs with huge or
foreign tar headers, a zip-bomb-like member, a signed but deeply nested
RELEASE.json, trailing garbage) or serves it from a loopback HTTP server of
its own (an endless releases API answer, deeply nested JSON, a gzip bomb, a
download that drips bytes), then runs the updater's real code path on each in
a fresh subprocess:

- a tarball: ``open_release`` with a trusted key, as scalebox-update does;
- the API: ``resolve.resolve`` against the loopback API;
- a download: ``fetch.fetch`` from the loopback server.

For each case it prints the child's peak RSS (ru_maxrss from wait4), its time
and its verdict (the first line of the refusal). Target: < 100 MB on every
input. A benchmark, not a test: it exits 0 when a figure misses the target,
1 only when it could not run.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from scalebox.release import build, manifest, signing

TARGET_MB = 100.0
VERSION = "1.2.3"
ARCH = os.uname().machine
TOP = f"scalebox-{VERSION}-{ARCH}"
GiB = 1 << 30
MiB = 1 << 20


@dataclass
class Figure:
    case: str
    input_bytes: int
    peak_rss_mb: float
    seconds: float
    exit_code: int
    verdict: str

    @property
    def within(self) -> bool:
        return self.peak_rss_mb < TARGET_MB


# --- hostile inputs ---------------------------------------------------------------------


def _header(name: str, kind: bytes, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, size
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def _gzip_of(path: Path, parts: Iterator[bytes]) -> Path:
    with path.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9) as gz:
        for part in parts:
            gz.write(part)
    return path


def _zeros(n: int) -> Iterator[bytes]:
    block = bytes(MiB)
    while n > 0:
        yield block[: min(n, MiB)]
        n -= MiB


def _signed_release(tmp: Path, key: Ed25519PrivateKey) -> Path:
    """A small, complete and good release (the wheel is a stand-in)."""
    tree = tmp / "tree"
    for relpath, data in {
        f"wheels/scalebox-{VERSION}-py3-none-any.whl": b"wheel " * 1000,
        "units/scaleboxd.service": b"[Service]\nExecStart=/bin/true\n",
        "scripts/install.sh": b"#!/bin/bash\n",
        manifest.SHIPPED_KEY: signing.public_pem(key.public_key()),
    }.items():
        (tree / relpath).parent.mkdir(parents=True, exist_ok=True)
        (tree / relpath).write_bytes(data)
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    release = build.make_manifest(
        tree, version=VERSION, arch=ARCH, python=[py], entry_points=["scaleboxd"]
    )
    build.seal(tree, release, key)
    return build.write_tarball(tree, tmp / "good.tar.gz", TOP)


def _members_of(tarball: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    out = []
    with tarfile.open(tarball) as archive:
        for info in archive:
            data = archive.extractfile(info) if info.isreg() else None
            out.append((info, data.read() if data else None))
    return out


def _tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
        end = archive.offset  # the end of the last member: more may follow it
    return buf.getvalue()[:end]


def tarball_cases(tmp: Path, key: Ed25519PrivateKey) -> dict[str, Path]:
    good = _signed_release(tmp, key)
    head = _members_of(good)[:3]  # the top directory, RELEASE.json, RELEASE.json.sig
    cases = {"good release (baseline)": good}
    cases["pax header declaring 1 GiB (1 GiB present)"] = _gzip_of(
        tmp / "pax.tar.gz", iter([_header("pax", tarfile.XHDTYPE, GiB), *_zeros(GiB)])
    )
    cases["GNU long name of 1 GiB"] = _gzip_of(
        tmp / "longname.tar.gz",
        iter([_header("././@LongLink", tarfile.GNUTYPE_LONGNAME, GiB), *_zeros(GiB)]),
    )
    record = b"60015 comment=" + b"x" * 60000 + b"\n"
    pax = _header("pax", tarfile.XHDTYPE, len(record)) + record.ljust(60416, b"\0")
    entry = pax + _header(f"{TOP}/f", tarfile.DIRTYPE, 0)
    cases["20 000 members, each behind a 60 KB pax header"] = _gzip_of(
        tmp / "many-pax.tar.gz", iter([entry] * 20000)
    )
    overlapping = b"2 " * 30_000 + b"=\n"  # tarfile < 3.11.10 kept ~1 GB of keywords
    cases["pax header of 30 000 overlapping records"] = _gzip_of(
        tmp / "overlapping-pax.tar.gz",
        iter(
            [
                _header("pax", tarfile.XHDTYPE, len(overlapping)),
                overlapping.ljust(60416, b"\0"),
                _header(f"{TOP}/f", tarfile.REGTYPE, 0),
            ]
        ),
    )
    # Signed head, then a listed file of 400 MiB of zeros whose hash is wrong.
    big = tarfile.TarInfo(f"{TOP}/wheels/scalebox-{VERSION}-py3-none-any.whl")
    big.size, big.mode = 400 * MiB, 0o644
    cases["zip-bomb-like listed member, 400 MiB"] = _gzip_of(
        tmp / "bomb.tar.gz",
        iter([_tar_bytes(head), big.tobuf(tarfile.PAX_FORMAT), *_zeros(400 * MiB)]),
    )
    cases["1 GiB of zeros after the archive"] = _gzip_of(
        tmp / "trailing.tar.gz", iter([gzip.decompress(good.read_bytes()), *_zeros(GiB)])
    )
    nested = b"[" * 500_000 + b"]" * 500_000
    members = _members_of(good)
    members[1][0].size = len(nested)
    members[1] = (members[1][0], nested)
    members[2] = (members[2][0], signing.sign(key, nested))
    members[2][0].size = 64
    cases["signed RELEASE.json nested 500 000 deep"] = _gzip_of(
        tmp / "nested.tar.gz", iter([_tar_bytes(members) + bytes(1024)])
    )
    return cases


# --- hostile servers --------------------------------------------------------------------

REPO = "acme/scalebox"
BOMB = gzip.compress(bytes(512 * MiB), compresslevel=9)


def _endless(req: BaseHTTPRequestHandler) -> None:
    req.send_response(200)
    req.end_headers()
    chunk = b"[" * 65536
    with contextlib.suppress(OSError):
        for _ in range(1 << 20):
            req.wfile.write(chunk)


def _send(req: BaseHTTPRequestHandler, body: bytes, headers: dict[str, str] | None = None) -> None:
    req.send_response(200)
    req.send_header("Content-Length", str(len(body)))
    for k, v in (headers or {}).items():
        req.send_header(k, v)
    req.end_headers()
    with contextlib.suppress(OSError):
        req.wfile.write(body)


def _drip(req: BaseHTTPRequestHandler) -> None:
    req.send_response(200)
    req.send_header("Content-Length", str(100 * MiB))
    req.end_headers()
    with contextlib.suppress(OSError):
        for _ in range(10_000):
            req.wfile.write(b"x")
            req.wfile.flush()
            time.sleep(0.2)


ROUTES: dict[str, Callable[[BaseHTTPRequestHandler], None]] = {
    "/endless/repos/acme/scalebox/releases/latest": _endless,
    "/nested/repos/acme/scalebox/releases/latest": lambda r: _send(
        r, b"[" * 500_000 + b"]" * 500_000
    ),
    "/bomb/repos/acme/scalebox/releases/latest": lambda r: _send(
        r, BOMB, {"Content-Encoding": "gzip"}
    ),
    "/drip/a.tar.gz": _drip,
    "/bomb/a.tar.gz": lambda r: _send(r, BOMB, {"Content-Encoding": "gzip"}),
}


@contextlib.contextmanager
def serving() -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            route = ROUTES.get(self.path)
            if route is None:
                _send(self, b'{"message": "Not Found"}')
                return
            route(self)

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


# --- the child: the updater's own code on one input ----------------------------------------


def child(kind: str, arg: str, scratch: str) -> int:
    from scalebox.errors import ScaleboxError  # noqa: PLC0415 - the child's imports count
    from scalebox.release.verify import open_release  # noqa: PLC0415
    from scalebox.update import fetch, resolve  # noqa: PLC0415
    from scalebox.update.limits import Limits  # noqa: PLC0415

    try:
        if kind == "tarball":
            keys = sorted(Path(scratch, "keys").glob("*.pub"))
            release = open_release(Path(arg), Path(scratch, "work", "release"), keys)
            print(f"accepted {release.version}")
        elif kind == "api":
            source = resolve.source_from_env(
                {"SCALEBOX_GITHUB_API": arg, "SCALEBOX_UPDATE_REPO": REPO}, allow_http=True
            )
            with resolve.client_for(source, timeout=10) as client:
                resolve.resolve(source, client, retries=0)
        else:
            with fetch.make_client(allow_http=True) as client:
                got = fetch.fetch(
                    arg,
                    Path(scratch, "downloads", "a.tar.gz"),
                    client,
                    progress=False,
                    limits=Limits(total=60, min_rate=1024, window=5),
                )
            # The verifier refuses it next; what matters here is what it cost to store.
            print(f"stored {got.stat().st_size} bytes as sent")
    except ScaleboxError as exc:
        print(f"refused: {exc.what}", file=sys.stderr)
        return 1  # refused or failed; this tool has no other outcomes
    return 0


def measure(case: str, kind: str, arg: str, size: int, scratch: Path) -> Figure:
    """Run one child on one input; its peak RSS is ru_maxrss from wait4 on that child."""
    subprocess.run(["rm", "-rf", str(scratch / "work"), str(scratch / "downloads")], check=True)
    out_path, err_path = scratch / "child.out", scratch / "child.err"
    started = time.monotonic()
    with out_path.open("w") as out, err_path.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tools.bench_hostile", "--child", kind, arg, str(scratch)],
            stdout=out,
            stderr=err,
        )
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.monotonic() - started
    lines = err_path.read_text().strip().splitlines() or out_path.read_text().strip().splitlines()
    verdict = lines[-1] if lines else "(no output)"
    return Figure(case, size, usage.ru_maxrss / 1024, seconds, proc.returncode, verdict[:160])


def run_all() -> list[Figure]:
    figures = []
    with tempfile.TemporaryDirectory(prefix="scalebox-bench-hostile-") as tmp_name:
        tmp = Path(tmp_name)
        private, public = signing.generate()
        key = signing.load_private_key(private, "bench")
        (tmp / "keys").mkdir()
        (tmp / "keys" / "release.pub").write_bytes(public)
        print("==> building hostile inputs (a few GiB of zeros, compressed)", file=sys.stderr)
        for case, path in tarball_cases(tmp, key).items():
            figures.append(measure(case, "tarball", str(path), path.stat().st_size, tmp))
            print(f"==> {figures[-1].case}: {figures[-1].peak_rss_mb:.1f} MB", file=sys.stderr)
        with serving() as base:
            for case, kind, url in (
                ("releases API: endless body", "api", f"{base}/endless"),
                ("releases API: JSON nested 500 000 deep", "api", f"{base}/nested"),
                ("releases API: gzip bomb (512 MiB in 0.5 MB)", "api", f"{base}/bomb"),
                ("download dripping a byte every 0.2 s", "fetch", f"{base}/drip/a.tar.gz"),
                ("download gzip-encoded (512 MiB in 0.5 MB)", "fetch", f"{base}/bomb/a.tar.gz"),
            ):
                figures.append(measure(case, kind, url, 0, tmp))
                print(f"==> {case}: {figures[-1].peak_rss_mb:.1f} MB", file=sys.stderr)
    return figures


def print_table(figures: list[Figure]) -> None:
    print(f"{'case':46} {'input':>9} {'peak RSS':>9} {'time':>6}  exit  verdict")
    for f in figures:
        size = f"{f.input_bytes / MiB:.1f} MB" if f.input_bytes else "server"
        mark = "PASS" if f.within else "MISS"
        print(
            f"{f.case:46} {size:>9} {f.peak_rss_mb:>6.1f} MB {f.seconds:>5.1f}s  "
            f"{f.exit_code:>4}  {mark} {f.verdict}"
        )
    worst = max(f.peak_rss_mb for f in figures)
    print(f"worst peak RSS {worst:.1f} MB; target < {TARGET_MB:.0f} MB on every input")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./do bench-hostile", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per case")
    parser.add_argument(
        "--child", nargs=3, metavar=("KIND", "ARG", "SCRATCH"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.child:
        return child(*args.child)
    try:
        figures = run_all()
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"bench-hostile: error: could not run: {exc}", file=sys.stderr)
        return 1
    if args.json:
        for f in figures:
            print(json.dumps({**asdict(f), "within_target": f.within}))
    else:
        print_table(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
