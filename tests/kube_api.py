"""A small Kubernetes API server stand-in for the tests of geneve_dp.kube: HTTPS on a
loopback address with a certificate made for the test, answering the pod list call
that `up` makes with what a JSON file holds (read again per request, so a test can
move a pod), and recording each request's path, query and bearer token.

Run inside a test's network namespace as `python -m tests.kube_api DIR PORT`; DIR
holds cert.pem, key.pem, pods.json, and gets requests.jsonl and ready (written once
listening)."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


def make_cert(directory: Path, ip: str = "127.0.0.1") -> None:
    """A self-signed certificate for ``ip`` (the CA file is the certificate itself)."""
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(directory / "key.pem"), "-out", str(directory / "cert.pem")),
            *("-subj", "/CN=kube-api-test", "-addext", f"subjectAltName=IP:{ip}"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )


def pod(name: str, ips: list[str], created: str, ready: bool = True) -> dict[str, Any]:
    """A pod as the API server lists it (the fields geneve_dp.kube reads)."""
    return {
        "metadata": {"name": name, "creationTimestamp": created},
        "status": {
            "podIP": ips[0] if ips else None,
            "podIPs": [{"ip": ip} for ip in ips],
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def serve(directory: Path, port: int) -> None:
    pods_file, log = directory / "pods.json", directory / "requests.jsonl"

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            with log.open("a") as out:
                record = {
                    "path": url.path,
                    "query": dict(urllib.parse.parse_qsl(url.query)),
                    "auth": self.headers.get("Authorization"),
                }
                out.write(json.dumps(record) + "\n")
            body = json.dumps({"kind": "PodList", "items": json.loads(pods_file.read_text())})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    (directory / "ready").write_text(str(server.server_address[1]))
    server.serve_forever()


if __name__ == "__main__":
    serve(Path(sys.argv[1]), int(sys.argv[2]))
