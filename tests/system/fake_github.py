"""A stand-in for GitHub's releases API and asset host, run INSIDE a test machine.

    python3 fake_github.py --port 8443 --root /mnt/release --log /run/api.jsonl \
        --tls CERT KEY --assets-base https://127.0.0.1:8444 --latest 1.1.0

Standard library only: it runs on the machine's own python3, on 127.0.0.1,
never on any other address. Every request is appended to --log as one JSON
line ({"path", "authorization"}), so a test can prove who saw GITHUB_TOKEN.

Routes:
    /files/<name>                    the file <name> from --root
    /truncated/<name>                200 with the full Content-Length, then only the
                                     first half and a closed connection (Range ignored,
                                     so no retry ever completes it)
    /api/<mode>/repos/<owner>/<repo>[/releases/latest | /releases/tags/<tag>]
                                     mode ok: a GitHub-style release of --latest whose
                                     assets live at --assets-base/files/; 403 or 404: that
                                     status with GitHub's JSON error; garbage: 200, not JSON
"""

from __future__ import annotations

import argparse
import json
import platform
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_log_lock = threading.Lock()


def _other_arch() -> str:
    return "aarch64" if platform.machine() != "aarch64" else "x86_64"


class Handler(BaseHTTPRequestHandler):
    server_version = "fake-github/1"
    args: argparse.Namespace

    def log_message(self, format: str, *args: object) -> None:
        pass  # --log has every request; stderr stays quiet

    def _record(self) -> None:
        line = json.dumps({"path": self.path, "authorization": self.headers.get("Authorization")})
        with _log_lock, Path(self.args.log).open("a") as log:
            log.write(line + "\n")

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, data: object) -> None:
        self._send(status, json.dumps(data).encode())

    def do_GET(self) -> None:
        self._record()
        parts = self.path.split("?")[0].strip("/").split("/")
        if len(parts) == 2 and parts[0] in ("files", "truncated"):
            self._file(parts[1], truncated=parts[0] == "truncated")
        elif len(parts) >= 4 and parts[0] == "api" and parts[2] == "repos":
            self._api(parts[1], parts[3:])
        else:
            self._json(404, {"message": "Not Found"})

    def _file(self, name: str, *, truncated: bool) -> None:
        path = Path(self.args.root) / name
        if "/" in name or name.startswith(".") or not path.is_file():
            self._json(404, {"message": "Not Found"})
            return
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/gzip")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if truncated:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(data)

    def _api(self, mode: str, rest: list[str]) -> None:
        if mode == "403":
            self._json(
                403,
                {
                    "message": "Resource not accessible by integration",
                    "documentation_url": "https://docs.github.com/rest",
                },
            )
        elif mode == "404":
            self._json(
                404, {"message": "Not Found", "documentation_url": "https://docs.github.com"}
            )
        elif mode == "garbage":
            self._send(200, b"<html><body>502 Bad Gateway</body></html>", "text/html")
        elif mode == "ok":
            tail, version = rest[2:], self.args.latest
            if not tail:
                self._json(200, {"full_name": "/".join(rest[:2])})
            elif tail in (["releases", "latest"], ["releases", "tags", f"v{version}"]):
                self._json(200, self._release())
            else:
                self._json(404, {"message": "Not Found"})
        else:
            self._json(404, {"message": "Not Found"})

    def _release(self) -> dict[str, object]:
        version = self.args.latest
        base = self.args.assets_base.rstrip("/")
        # Another arch's build first: the updater must pick the asset for its own.
        names = [
            f"scalebox-{version}-{_other_arch()}.tar.gz",
            f"scalebox-{version}-{platform.machine()}.tar.gz",
        ]
        return {
            "tag_name": f"v{version}",
            "name": f"Scalebox {version}",
            "assets": [
                {"name": name, "browser_download_url": f"{base}/files/{name}"} for name in names
            ],
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--root", required=True, help="folder whose files /files/ serves")
    parser.add_argument("--log", required=True, help="JSON lines, one per request")
    parser.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"), help="serve https")
    parser.add_argument("--assets-base", default="", help="where release assets are served")
    parser.add_argument("--latest", default="", help="the version of the latest release")
    args = parser.parse_args()
    Handler.args = args
    httpd = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    if args.tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*args.tls)
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    httpd.serve_forever()


if __name__ == "__main__":
    main()
