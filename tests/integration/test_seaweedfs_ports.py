"""Every socket the embedded SeaweedFS opened refuses writes without credentials; S3 with them still works.

`weed mini` runs a master, a volume server, a filer, an S3 gateway and an admin server in one process,
each with an HTTP and a gRPC port (and Unix sockets in /tmp). The test finds every listening socket the
server process holds (from /proc, not from our own state file, so a port we did not know about is tried
too) and throws at each one the writes a local process without our credentials could attempt:

- filer HTTP: PUT / multipart POST / DELETE under /buckets/<bucket>/, a TUS upload;
- master HTTP: /dir/assign (then an upload to the volume it names, with the token it hands out);
- volume HTTP: a needle upload to a made-up file id;
- S3: an anonymous PUT, and a PUT signed with our access key but a wrong secret;
- admin HTTP: bucket creation through its API;
- gRPC, in plaintext and over TLS without a client certificate: the filer's CreateEntry. Any gRPC answer
  at all (even "unimplemented" from a master or volume port) counts as an open port: every SeaweedFS gRPC
  service has write calls.

A probe counts as accepted when the server answers 2xx (gRPC: answers at all), and, independently of
what it answered, nothing the probes wrote may appear in the bucket and the object they tried to delete
must survive.
"""
from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import struct
import uuid
from pathlib import Path

import pytest

from sf_testing import tally
from squeezeflow import services

pytestmark = pytest.mark.integration

LABEL = "embedded S3 server ports and sockets refusing unauthenticated writes"


# --- what the server process listens on ---------------------------------------------------------------

def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:["):-1]))
    return inodes


def listening_sockets(pid: int) -> list[tuple[str, int | str]]:
    """("tcp", port) and ("unix", path) for every listening socket process `pid` holds."""
    inodes = _socket_inodes(pid)
    found: list[tuple[str, int | str]] = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                # cols: sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
                if cols[3] == "0A" and int(cols[9]) in inodes:  # 0A: TCP_LISTEN
                    port = int(cols[1].rsplit(":", 1)[1], 16)
                    if ("tcp", port) not in found:
                        found.append(("tcp", port))
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            cols = line.split()
            # cols: Num RefCount Protocol Flags Type St Inode [Path]; flag 0x10000 = listening (SO_ACCEPTCON)
            if len(cols) >= 8 and int(cols[3], 16) & 0x10000 and int(cols[6]) in inodes:
                found.append(("unix", cols[7]))
    return found


# --- talking to one socket ------------------------------------------------------------------------------

# Generous: a slow answer must not pass for a refusal on a loaded machine.
TIMEOUT_S = 60.0


def _connect(endpoint, timeout: float = TIMEOUT_S) -> socket.socket:
    kind, where = endpoint
    if kind == "tcp":
        return socket.create_connection(("127.0.0.1", where), timeout=timeout)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(where)
    return s


class _Conn(http.client.HTTPConnection):
    def __init__(self, endpoint):
        super().__init__("127.0.0.1", endpoint[1] if endpoint[0] == "tcp" else 80, timeout=TIMEOUT_S)
        self.endpoint = endpoint

    def connect(self):
        self.sock = _connect(self.endpoint)


def http_request(endpoint, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    """(status, body) or (None, b"") when the socket does not speak HTTP/1.1."""
    conn = _Conn(endpoint)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read()
    except (OSError, http.client.HTTPException):
        return None, b""
    finally:
        conn.close()


def _multipart(name: str, data: bytes) -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def _pb_field(number: int, value: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    key, n, varint = (number << 3) | 2, len(value), b""
    while True:
        byte, n = n & 0x7F, n >> 7
        varint += bytes([byte | (0x80 if n else 0)])
        if not n:
            break
    return bytes([key]) + varint + value


def _h2_frame(ftype: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", stream) + payload


def _hpack_literal(name: str, value: str) -> bytes:
    # "Literal header field without indexing, new name", no Huffman coding (lengths stay under 127).
    return b"\x00" + bytes([len(name)]) + name.encode() + bytes([len(value)]) + value.encode()


def grpc_create_entry(endpoint, directory: str, name: str, tls: bool) -> bool:
    """Send filer_pb.SeaweedFiler/CreateEntry over HTTP/2; True if a gRPC response (HEADERS) came back."""
    entry = _pb_field(1, name.encode()) + _pb_field(9, b"forged through gRPC")
    message = _pb_field(1, directory.encode()) + _pb_field(2, entry)
    authority = f"127.0.0.1:{endpoint[1]}" if endpoint[0] == "tcp" else "localhost"
    headers = b"".join(_hpack_literal(k, v) for k, v in (
        (":method", "POST"), (":scheme", "https" if tls else "http"), (":path", "/filer_pb.SeaweedFiler/CreateEntry"),
        (":authority", authority), ("content-type", "application/grpc"), ("te", "trailers")))
    request = (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _h2_frame(0x4, 0, 0, b"")
               + _h2_frame(0x1, 0x4, 1, headers)  # END_HEADERS
               + _h2_frame(0x0, 0x1, 1, b"\x00" + struct.pack(">I", len(message)) + message))  # END_STREAM
    try:
        sock = _connect(endpoint)
    except OSError:
        return False
    try:
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # an attacker does not check either
            ctx.set_alpn_protocols(["h2"])
            sock = ctx.wrap_socket(sock)
        sock.sendall(request)
        buf = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return False
            buf += chunk
            while len(buf) >= 9:
                length = int.from_bytes(buf[:3], "big")
                ftype, stream = buf[3], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
                if len(buf) < 9 + length:
                    break
                if ftype == 0x1 and stream == 1:
                    return True  # the server answered our call: it serves gRPC to anyone
                if ftype == 0x7:  # GOAWAY
                    return False
                buf = buf[9 + length:]
            if buf[:4] == b"HTTP":  # an HTTP/1.1 server answering our preface
                return False
    except (OSError, ssl.SSLError, ValueError):
        return False
    finally:
        sock.close()


# --- the probes ----------------------------------------------------------------------------------------

def unauthenticated_writes(endpoint, bucket: str, prefix: str, victim: str, access_key: str) -> list[str]:
    """Names of the writes this socket accepted without credentials."""
    accepted = []

    def ok(status):
        return status is not None and 200 <= status < 300

    data = b"forged entry"
    if ok(http_request(endpoint, "PUT", f"/buckets/{bucket}/{prefix}/filer-put", data)[0]):
        accepted.append("filer PUT")
    body, headers = _multipart("filer-post", data)
    if ok(http_request(endpoint, "POST", f"/buckets/{bucket}/{prefix}/", body, headers)[0]):
        accepted.append("filer multipart POST")
    if ok(http_request(endpoint, "DELETE", f"/buckets/{bucket}/{victim}")[0]):
        accepted.append("filer DELETE")
    if ok(http_request(endpoint, "POST", f"/.tus/buckets/{bucket}/{prefix}/tus", b"",
                       {"Tus-Resumable": "1.0.0", "Upload-Length": str(len(data))})[0]):
        accepted.append("filer TUS upload")

    status, reply = http_request(endpoint, "GET", "/dir/assign")
    if ok(status):
        accepted.append("master /dir/assign")
        try:
            assigned = json.loads(reply)
        except ValueError:
            assigned = {}
        if assigned.get("fid") and assigned.get("url"):
            host, port = assigned["url"].rsplit(":", 1)
            body, headers = _multipart("via-assign", data)
            if assigned.get("auth"):
                headers["Authorization"] = f"BEARER {assigned['auth']}"
            if ok(http_request(("tcp", int(port)), "POST", f"/{assigned['fid']}", body, headers)[0]):
                accepted.append("volume upload with the master's token")
    body, headers = _multipart("needle", data)
    if ok(http_request(endpoint, "POST", "/1,0123456789abcdef01", body, headers)[0]):
        accepted.append("volume upload without a token")

    if ok(http_request(endpoint, "PUT", f"/{bucket}/{prefix}/s3-anonymous", data)[0]):
        accepted.append("anonymous S3 PUT")
    path = f"/{bucket}/{prefix}/s3-wrong-secret"
    if ok(http_request(endpoint, "PUT", path, data, _signed_with_wrong_secret(endpoint, path, data, access_key))[0]):
        accepted.append("S3 PUT signed with a wrong secret")
    if ok(http_request(endpoint, "POST", "/api/s3/buckets", json.dumps({"name": f"{prefix}-bucket"}).encode(),
                       {"Content-Type": "application/json"})[0]):
        accepted.append("admin API bucket creation")

    for tls in (False, True):
        if grpc_create_entry(endpoint, f"/buckets/{bucket}/{prefix}", "grpc-entry", tls):
            accepted.append("gRPC over TLS without a client certificate" if tls else "plaintext gRPC")
    return accepted


def _signed_with_wrong_secret(endpoint, path: str, body: bytes, access_key: str) -> dict:
    """Headers of an S3 PUT signed (SigV4) with our access key id and a secret that is not ours."""
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    host = f"127.0.0.1:{endpoint[1]}" if endpoint[0] == "tcp" else "localhost"
    request = AWSRequest(method="PUT", url=f"http://{host}{path}", data=body)
    S3SigV4Auth(Credentials(access_key, "not-the-secret-" + uuid.uuid4().hex), "s3", "us-east-1").add_auth(request)
    return dict(request.headers.items())


def test_no_server_socket_accepts_an_unauthenticated_write(s3_server: dict):
    from squeezeflow.s3 import client

    info = services.ensure_s3()  # the session's server, restarted if an earlier test stopped it
    bucket, pid = info["bucket"], info["pid"]
    s3 = client()
    prefix = f"probe-{uuid.uuid4().hex[:10]}"
    victim = f"{prefix}-victim"
    s3.put_object(Bucket=bucket, Key=victim, Body=b"must survive")  # authenticated S3 works

    endpoints = listening_sockets(pid)
    tcp_ports = {where for kind, where in endpoints if kind == "tcp"}
    s3_port = int(info["endpoint"].rsplit(":", 1)[1])
    # master, volume, filer, S3 and admin each have an HTTP and a gRPC port: the discovery must see them.
    assert s3_port in tcp_ports and len(tcp_ports) >= 8, endpoints

    open_sockets = {}
    for endpoint in endpoints:
        accepted = unauthenticated_writes(endpoint, bucket, prefix, victim, os.environ["AWS_ACCESS_KEY_ID"])
        tally(LABEL, not accepted)
        if accepted:
            open_sockets[f"{endpoint[0]}:{endpoint[1]}"] = accepted
    print(f"\n[ports] {len(endpoints)} sockets tried ({len(tcp_ports)} TCP ports), "
          f"{len(open_sockets)} accept unauthenticated writes")

    landed = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    assert open_sockets == {}, open_sockets
    assert landed == [victim], landed  # nothing forged arrived, the victim was not deleted
    assert s3.get_object(Bucket=bucket, Key=victim)["Body"].read() == b"must survive"
    buckets = [b["Name"] for b in s3.list_buckets()["Buckets"]]
    assert f"{prefix}-bucket" not in buckets, buckets
