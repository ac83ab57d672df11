"""The app of the odyn e2e tests: plain HTTP on 8080 and 8443 (behind TLS ingress), inside odyn.

GET /             a greeting
GET /fetch?url=U  fetch U through the egress proxy (from the environment odyn sets); status+body
POST /api/PATH    relay to the in-enclave API on 127.0.0.1:9000 (not exposed by ingress)
GET /exit?code=N  answer, then exit with N
"""

import json
import os
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    def log_message(self, fmt, *args):
        print("app: " + fmt % args, flush=True)

    def reply(self, status, body, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        if url.path == "/":
            self.reply(200, b"hello from the enclave\n", "text/plain")
        elif url.path == "/fetch":
            self.reply(200, json.dumps(fetch(query["url"])).encode())
        elif url.path == "/exit":
            self.reply(200, b"bye\n", "text/plain")
            threading.Timer(0.2, os._exit, [int(query["code"])]).start()
        else:
            self.reply(404, b"{}")

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        target = "http://127.0.0.1:9000" + self.path[len("/api") :]
        request = urllib.request.Request(target, data=body, method="POST")
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                self.reply(response.status, response.read())
        except urllib.error.HTTPError as err:
            self.reply(err.code, err.read())


def fetch(url):
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return {"status": response.status, "body": response.read().decode()}
    except urllib.error.HTTPError as err:
        return {"status": err.code, "body": err.read().decode(errors="replace")}


def main():
    print("app: starting, proxy", os.environ.get("http_proxy"), flush=True)
    servers = [ThreadingHTTPServer(("127.0.0.1", port), Handler) for port in (8080, 8443)]
    for server in servers[1:]:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    servers[0].serve_forever()


if __name__ == "__main__":
    sys.exit(main())
