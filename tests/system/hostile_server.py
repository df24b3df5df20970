"""Hostile servers for scalebox-update, run INSIDE a test machine on 127.0.0.1 (plain http).

    python3 hostile_server.py --port 8450 --root /mnt/release

Standard library only. The first path segment picks the misbehaviour; the
rest of the path (what the updater appends) is ignored:

    /endless/...      200, no length, '[' forever: an endless releases API answer
    /nested/...       200, JSON nested 200 000 deep
    /bomb/...         200, Content-Encoding: gzip, 512 MiB of spaces in about 0.5 MB
    /absurd-tag/...   a GitHub release whose tag is v followed by 5000 nines
    /drip/<name>      the file <name> from --root with its full Content-Length,
                      one byte every two seconds
    /drip-headers/... a status line, then one byte of a header every two seconds
    /bad-etag/...     200 with an ETag holding a non-ASCII byte, cut halfway; a
                      Range request gets the rest (206); the bytes are no release
    /escape/...       a GitHub release whose one asset's name is a terminal escape
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

BOMB = gzip.compress(b" " * (512 * 1024 * 1024), compresslevel=9)


class Handler(BaseHTTPRequestHandler):
    root = Path("/mnt/release")

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(body)

    def do_GET(self) -> None:
        parts = self.path.strip("/").split("/")
        mode = parts[0]
        if mode == "endless":
            self.send_response(200)
            self.end_headers()
            with contextlib.suppress(OSError):
                while True:
                    self.wfile.write(b"[" * 65536)
        elif mode == "nested":
            self._send(b"[" * 200_000 + b"]" * 200_000)
        elif mode == "bomb":
            self._send(BOMB, {"Content-Encoding": "gzip"})
        elif mode == "absurd-tag":
            tag = "v" + "9" * 5000
            self._send(json.dumps({"tag_name": tag, "assets": []}).encode())
        elif mode == "drip" and len(parts) == 2 and "/" not in parts[1]:
            data = (self.root / parts[1]).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            with contextlib.suppress(OSError):
                for i in range(len(data)):
                    self.wfile.write(data[i : i + 1])
                    self.wfile.flush()
                    time.sleep(2)
        elif mode == "drip-headers":
            with contextlib.suppress(OSError):
                self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Drip: ")
                for _ in range(100_000):
                    self.wfile.flush()
                    time.sleep(2)
                    self.wfile.write(b"a")
        elif mode == "bad-etag":
            self._bad_etag(b"not a release\n" * 10_000)
        elif mode == "escape":
            asset = {"name": "\x1b]0;owned\x07\x1b[2J", "browser_download_url": "https://x/a"}
            self._send(json.dumps({"tag_name": "v9.0.0", "assets": [asset]}).encode())
        else:
            self._send(b'{"message": "Not Found"}')

    def _bad_etag(self, data: bytes) -> None:
        sent = self.headers.get("Range", "bytes=0-")
        start = int(sent.removeprefix("bytes=").removesuffix("-"))
        if start:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            self.wfile.write(data[start:])
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("ETag", '"v\xe9"')  # latin-1 on the wire
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.close_connection = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--root", required=True)
    args = parser.parse_args()
    Handler.root = Path(args.root)
    httpd = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    httpd.daemon_threads = True
    httpd.serve_forever()


if __name__ == "__main__":
    main()
