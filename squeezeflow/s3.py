"""One way to build an S3 client, shared by the artifact store and the registry.

Endpoint: SQUEEZEFLOW_S3_ENDPOINT, else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (boto3's own variables),
else AWS itself. Credentials: boto3's normal chain (environment, profile, instance role), which a prefect-aws block fills in
when one is named (aws_blocks.py). The embedded
SeaweedFS server exports its endpoint and credentials into the environment of the process that uses it
(see services.py), so nothing here ever prints or stores a secret.
"""
from __future__ import annotations

import base64
import contextlib
import os
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterator

from .errors import BadInput


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # no leading or trailing slash; may be ""

    @classmethod
    def parse(cls, uri: str) -> "S3Location":
        if not uri.startswith("s3://"):
            raise BadInput(f"not an s3:// URI: {uri!r}")
        rest = uri[len("s3://"):]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise BadInput(f"S3 URI has no bucket: {uri!r} (expected s3://BUCKET/PREFIX)")
        return cls(bucket, prefix.strip("/"))

    def key(self, *parts: str) -> str:
        return "/".join(p.strip("/") for p in (self.prefix, *parts) if p and p.strip("/"))

    def uri(self, *parts: str) -> str:
        return f"s3://{self.bucket}/{self.key(*parts)}"


def credentials_hint() -> str:
    """What to check when S3 refuses: the prefect-aws block the credentials came from (aws_blocks.py
    sets SQUEEZEFLOW_S3_BLOCK to its name), else the environment variables."""
    return os.environ.get("SQUEEZEFLOW_S3_BLOCK") or "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"


def endpoint_url() -> str | None:
    return (os.environ.get("SQUEEZEFLOW_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL") or None)


def client(connect_timeout: float = 5.0, max_attempts: int = 5):
    """A boto3 S3 client with bounded retries (standard mode: exponential backoff on 5xx/throttling)."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ConfigParseError

    cfg = Config(
        retries={"max_attempts": max_attempts, "mode": "standard"},
        connect_timeout=connect_timeout,
        read_timeout=120,
        s3={"addressing_style": "path"},
        # Only send checksums when an operation requires them; we set SHA256 ourselves on uploads.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    try:
        return boto3.client("s3", endpoint_url=endpoint_url(), region_name=region, config=cfg)
    except ConfigParseError as e:  # a corrupt ~/.aws/config or credentials file: the user's to fix
        raise BadInput(f"{e} (AWS_CONFIG_FILE / AWS_SHARED_CREDENTIALS_FILE): fix or move it") from None


def check_reachable(uri: str) -> None:
    """Preflight: fail fast with one clear line when the bucket behind `uri` cannot be reached."""
    from botocore.exceptions import BotoCoreError, ClientError

    loc = S3Location.parse(uri)
    c = client(connect_timeout=3.0, max_attempts=2)
    try:
        c.head_bucket(Bucket=loc.bucket)
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchBucket"):
            raise BadInput(f"S3 bucket {loc.bucket!r} does not exist at {endpoint_url() or 'AWS'}; create it first") from None
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise BadInput(f"S3 access to bucket {loc.bucket!r} denied ({code}): check {credentials_hint()}") from None
        raise BadInput(f"S3 bucket {loc.bucket!r} not usable: {code}") from None
    except (BotoCoreError, OSError) as e:
        raise BadInput(f"S3 endpoint {endpoint_url() or 'AWS'} unreachable ({type(e).__name__}); "
                       "check SQUEEZEFLOW_S3_ENDPOINT or start the embedded server") from None


def error_code(e: Exception) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))


class S3Objects:
    """The object operations the registry is built from, on one bucket/prefix."""

    def __init__(self, uri: str, s3_client: Any = None):
        self.loc = S3Location.parse(uri)
        self.uri = self.loc.uri().rstrip("/")
        self._c = s3_client or client()

    def _keys(self, prefix: str) -> Iterator[tuple[str, datetime]]:
        for page in self._c.get_paginator("list_objects_v2").paginate(Bucket=self.loc.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                yield obj["Key"], obj["LastModified"]

    def _head(self, key: str, checksum: bool = False) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            extra = {"ChecksumMode": "ENABLED"} if checksum else {}
            return self._c.head_object(Bucket=self.loc.bucket, Key=key, **extra)
        except ClientError as e:
            if error_code(e) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def _get(self, key: str, missing_ok: bool = False) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            return self._c.get_object(Bucket=self.loc.bucket, Key=key)["Body"].read()
        except ClientError as e:
            if missing_ok and error_code(e) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise

    def _stream(self, key: str, chunk: int = 1 << 20) -> Iterator[bytes]:
        body = self._c.get_object(Bucket=self.loc.bucket, Key=key)["Body"]
        try:
            yield from body.iter_chunks(chunk)
        finally:
            body.close()

    def _put_new(self, key: str, body: Any, sha256_hex: str) -> bool:
        """PUT only if the key is absent. False when it already exists (HTTP 412)."""
        from botocore.exceptions import ClientError

        from .errors import IntegrityError

        try:
            self._c.put_object(Bucket=self.loc.bucket, Key=key, Body=body, IfNoneMatch="*",
                               ChecksumSHA256=base64.b64encode(bytes.fromhex(sha256_hex)).decode())
            return True
        except ClientError as e:
            if error_code(e) in ("PreconditionFailed", "412"):
                return False
            if error_code(e) in ("BadDigest", "XAmzContentSHA256Mismatch", "InvalidDigest"):
                raise IntegrityError(f"upload of {key} was rejected: the bytes sent do not match their "
                                     "sha256 (file changed during upload?)") from None
            raise

    # Files above the threshold go up in parts (S3 refuses a single PUT over 5 GiB; parts also retry
    # alone). Each part carries its own SHA256, which the server checks; the whole object is checked
    # after the upload. Class attributes so tests and operators can lower them.
    multipart_threshold = 256 * 1024**2
    multipart_chunksize = 64 * 1024**2

    def _put_new_file(self, key: str, path: Any, sha256_hex: str, size: int) -> bool:
        """`_put_new` for a file of any size: one conditional PUT up to `multipart_threshold`, else a
        create-only multipart upload (s3transfer). False when the key already exists."""
        if size <= self.multipart_threshold:
            with open(path, "rb") as body:
                return self._put_new(key, body, sha256_hex)
        return self._put_new_multipart(key, path, sha256_hex, size)

    def _put_new_multipart(self, key: str, path: Any, sha256_hex: str, size: int) -> bool:
        from boto3.s3.transfer import TransferConfig, create_transfer_manager
        from botocore.exceptions import ClientError
        from s3transfer.utils import ChunksizeAdjuster

        from .errors import IntegrityError

        if self._head(key) is not None:
            return False
        config = TransferConfig(multipart_threshold=self.multipart_threshold,
                                multipart_chunksize=self.multipart_chunksize, max_concurrency=4)

        def create_only(params, **_):  # s3transfer passes no IfNoneMatch: add it to the completing call
            params["IfNoneMatch"] = "*"

        events = self._c.meta.events
        events.register("before-parameter-build.s3.CompleteMultipartUpload", create_only, unique_id="sf-create-only")
        try:
            with create_transfer_manager(self._c, config) as manager:
                manager.upload(str(path), self.loc.bucket, key, extra_args={"ChecksumAlgorithm": "SHA256"}).result()
        except ClientError as e:
            if error_code(e) in ("PreconditionFailed", "412"):
                return False
            if error_code(e) in ("BadDigest", "XAmzContentSHA256Mismatch", "InvalidDigest", "InvalidPart"):
                raise IntegrityError(f"multipart upload of {key} was rejected: a part's bytes do not match "
                                     "its sha256") from None
            raise
        finally:
            events.unregister("before-parameter-build.s3.CompleteMultipartUpload", unique_id="sf-create-only")
        part = ChunksizeAdjuster().adjust_chunksize(self.multipart_chunksize, size)
        self._check_multipart(key, path, sha256_hex, size, part)
        return True

    def _check_multipart(self, key: str, path: Any, sha256_hex: str, size: int, part: int) -> None:
        """The stored object is the file the manifest describes: the local file still hashes to
        `sha256_hex`, and the server's composite checksum (sha256 of the parts' sha256s) is the one those
        bytes give; a server that reports no checksum has the object read back and hashed instead."""
        import hashlib

        from .errors import IntegrityError

        whole, digests = hashlib.sha256(), []
        with open(path, "rb") as f:
            while chunk := f.read(part):
                whole.update(chunk)
                digests.append(hashlib.sha256(chunk).digest())
        if whole.hexdigest() != sha256_hex:
            raise IntegrityError(f"{path} changed while it was uploaded to {key}: publish again")
        head = self._head(key, checksum=True) or {}
        stored = head.get("ChecksumSHA256")
        composite = base64.b64encode(hashlib.sha256(b"".join(digests)).digest()).decode()
        if head.get("ContentLength") != size:
            raise IntegrityError(f"{key}: stored {head.get('ContentLength')} bytes, uploaded {size}")
        if stored:
            ok = stored.split("-")[0] in (composite, base64.b64encode(bytes.fromhex(sha256_hex)).decode())
        else:
            h = hashlib.sha256()
            for chunk in self._stream(key):
                h.update(chunk)
            ok = h.hexdigest() == sha256_hex
        if not ok:
            raise IntegrityError(f"{key}: the stored object does not match the uploaded file's sha256")

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Turn configuration-type S3 failures into one clear BadInput line; let the rest through."""
        from botocore.exceptions import (ClientError, ConnectTimeoutError, EndpointConnectionError,
                                         NoCredentialsError)

        where = endpoint_url() or "AWS"
        try:
            yield
        except (EndpointConnectionError, ConnectTimeoutError) as e:
            raise BadInput(f"cannot {action}: S3 endpoint {where} unreachable ({type(e).__name__}); "
                           "check SQUEEZEFLOW_S3_ENDPOINT or start the embedded server") from None
        except NoCredentialsError:
            raise BadInput(f"cannot {action}: no S3 credentials; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY") from None
        except ClientError as e:
            code = error_code(e)
            if code in ("NoSuchBucket",):
                raise BadInput(f"cannot {action}: bucket {self.loc.bucket!r} does not exist at {where}") from None
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise BadInput(f"cannot {action}: access denied by {where} ({code}); check {credentials_hint()}") from None
            raise
