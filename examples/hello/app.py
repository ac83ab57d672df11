"""The hello example: a small HTTP app for an enclave (Python standard library only).

GET /            a greeting
GET /heartbeat   what the "heartbeat" init service last wrote (JSON), or 503 before its first beat
GET /egress      fetch https://example.com/ through the egress proxy (the one name the manifest
                 allows); {"url", "status", "body"} where status 403 means egress refused it
GET /fetch?url=U the same for any URL U, to see the egress policy at work (403 when denied)

odyn sets http_proxy/https_proxy (and the upper-case forms) to its egress proxy; urllib uses them.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT = int(os.environ.get("HELLO_PORT", "8080"))
HEARTBEAT_FILE = os.environ.get("HELLO_HEARTBEAT_FILE", "/tmp/hello-heartbeat")
ALLOWED_URL = "https://example.com/"
BODY_LIMIT = 2048


def fetch(url: str) -> dict:
    """GET url through the proxy from the environment; errors become a status, never a crash."""
    try:
        with urllib.request.urlopen(url, timeout=20) as response:
            return {"url": url, "status": response.status, "body": _text(response.read())}
    except urllib.error.HTTPError as err:
        return {"url": url, "status": err.code, "body": _text(err.read())}
    except (urllib.error.URLError, OSError) as err:
        return {"url": url, "status": 502, "body": str(getattr(err, "reason", err))}


def _text(data: bytes) -> str:
    return data[:BODY_LIMIT].decode("utf-8", "replace")


def heartbeat() -> tuple[int, dict]:
    try:
        with open(HEARTBEAT_FILE, encoding="utf-8") as beat:
            return 200, json.load(beat)
    except (OSError, ValueError):
        return 503, {"error": f"no heartbeat yet in {HEARTBEAT_FILE}"}


class Handler(BaseHTTPRequestHandler):
    server_version = "hello/1"

    def log_message(self, fmt: str, *args: object) -> None:
        print("hello: " + fmt % args, flush=True)

    def reply(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def reply_json(self, status: int, document: dict) -> None:
        self.reply(status, json.dumps(document).encode() + b"\n")

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        if url.path == "/":
            self.reply(200, b"hello from the enclave\n", "text/plain")
        elif url.path == "/heartbeat":
            self.reply_json(*heartbeat())
        elif url.path == "/egress":
            self.reply_json(200, fetch(ALLOWED_URL))
        elif url.path == "/fetch" and "url" in query:
            self.reply_json(200, fetch(query["url"]))
        else:
            self.reply_json(404, {"error": f"no such path: {url.path}"})


def main() -> int:
    print(f"hello: listening on 127.0.0.1:{PORT}", flush=True)
    # Inside the enclave ingress delivers connections to 127.0.0.1:PORT; nothing else can reach it.
    ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
