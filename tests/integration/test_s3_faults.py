"""S3 faults during publish, injected by a small HTTP proxy on loopback in front of the real SeaweedFS:
500 errors are retried with backoff; a publish whose requests keep failing, or whose server vanishes
mid-upload, raises and leaves no visible entry and no moved alias."""
from __future__ import annotations

import http.client
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from squeezeflow.registry import Registry, content_id, verify_dir
from squeezeflow.store import canonical_json, sha256_bytes

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MODEL, RECIPE = "tiny", "rtn-w4g32"
INTERNAL_ERROR = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
                  b"<Message>injected by the test proxy</Message></Error>")


class FaultProxy:
    """Forwards every request to `upstream` (host, port) unchanged (the Host header too, so SigV4
    signatures still verify), except those `rule(method, path)` answers with 500. Records every request."""

    def __init__(self, upstream: tuple[str, int], rule):
        self.upstream, self.rule, self.log, self.gone = upstream, rule, [], False
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _any(self):
                if proxy.gone:  # a dead server: drop even kept-alive connections without an answer
                    self.close_connection = True
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                injected = proxy.rule(self.command, self.path)
                proxy.log.append((time.monotonic(), self.command, self.path, injected))
                if injected:
                    self.send_response(500)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(INTERNAL_ERROR)))
                    self.end_headers()
                    self.wfile.write(INTERNAL_ERROR)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                conn.request(self.command, self.path, body=body, headers=dict(self.headers))
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.gone = True
        self.server.shutdown()
        self.server.server_close()

    def puts(self, suffix: str = "") -> list:
        return [r for r in self.log if r[1] == "PUT" and r[2].split("?")[0].endswith(suffix)]


def authentic_artifact(root: Path) -> tuple[Path, str]:
    files = {"config.json": b'{"model_type": "llama"}', "model.safetensors": bytes(range(256)) * 64,
             "report/report.md": b"# report\n"}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    listing = {rel: {"sha256": sha256_bytes(d), "size": len(d)} for rel, d in files.items()}
    lineage = {"model": {"name": MODEL}, "recipe": {"name": RECIPE}}
    manifest = {"artifact_id": content_id(listing, lineage), "model": MODEL, "recipe": RECIPE,
                "lineage": lineage, "files": listing}
    (root / "manifest.json").write_bytes(canonical_json(manifest))
    return root, manifest["artifact_id"]


@pytest.fixture
def via_proxy(s3_server, monkeypatch):
    """Start a proxy with a rule and point this process's S3 client at it."""
    from urllib.parse import urlparse

    proxies = []

    def start(rule) -> FaultProxy:
        up = urlparse(s3_server["endpoint"])
        proxy = FaultProxy((up.hostname, up.port), rule)
        proxies.append(proxy)
        monkeypatch.setenv("SQUEEZEFLOW_S3_ENDPOINT", proxy.url)
        return proxy

    yield start
    for p in proxies:
        p.stop()


def test_transient_500s_are_retried_with_backoff(via_proxy, s3_server, tmp_path):
    failures = {"left": 3}

    def rule(method, path):
        if method == "PUT" and failures["left"] > 0:
            failures["left"] -= 1
            return True
        return False

    proxy = via_proxy(rule)
    reg = Registry(f"s3://{s3_server['bucket']}/faults-{uuid.uuid4().hex[:8]}")
    art, aid = authentic_artifact(tmp_path / "a")
    entry = reg.publish(art, MODEL, RECIPE, aid)
    injected = [r for r in proxy.log if r[3]]
    assert len(injected) == 3
    # the same object was tried again after each 500, with growing pauses (boto3's exponential backoff)
    first_key = injected[0][2]
    tries = [t for t, m, p, _ in proxy.log if m == "PUT" and p == first_key]
    assert len(tries) == 4 and tries[-1] - tries[0] > 0.05, tries
    assert verify_dir(reg.pull(entry.uri, tmp_path / "pulled"))["artifact_id"] == aid


@pytest.mark.parametrize("fault", ["manifest PUT always fails", "server gone mid-upload"])
def test_a_failed_publish_leaves_no_entry_and_no_alias(fault, via_proxy, s3_server, tmp_path):
    state = {"puts": 0}

    def rule(method, path):
        if method != "PUT":
            return False
        if fault == "manifest PUT always fails":
            return path.split("?")[0].endswith("/manifest.json")
        state["puts"] += 1
        return False

    proxy = via_proxy(rule)
    prefix = f"faults-{uuid.uuid4().hex[:8]}"
    reg = Registry(f"s3://{s3_server['bucket']}/{prefix}")
    art, aid = authentic_artifact(tmp_path / "a")
    if fault == "server gone mid-upload":
        real_put = reg._put_file

        def put_then_vanish(*args, **kwargs):
            real_put(*args, **kwargs)
            proxy.stop()  # after the first file: every later request finds nothing listening

        reg._put_file = put_then_vanish
    with pytest.raises(Exception) as e:
        reg.publish(art, MODEL, RECIPE, aid)
    message = str(e.value)
    assert ("unreachable" in message) if fault == "server gone mid-upload" else ("InternalError" in message), message
    if fault == "manifest PUT always fails":
        assert len(proxy.puts("/manifest.json")) >= 5  # retried (the client's max_attempts), then given up

    # Seen straight from the server (not through the proxy): no entry, no alias.
    direct = Registry(f"s3://{s3_server['bucket']}/{prefix}", s3_client=_direct_client(s3_server))
    assert direct.list() == []
    keys = [o["Key"] for page in direct._c.get_paginator("list_objects_v2").paginate(
        Bucket=s3_server["bucket"], Prefix=prefix + "/") for o in page.get("Contents", [])]
    assert not [k for k in keys if k.endswith("manifest.json") or "/aliases/" in k], keys
    with pytest.raises(Exception, match="no alias|no registry entry"):
        direct.resolve(f"{MODEL}/{RECIPE}@latest")


def _direct_client(s3_server):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=s3_server["endpoint"], region_name="us-east-1",
                        config=Config(s3={"addressing_style": "path"}))
