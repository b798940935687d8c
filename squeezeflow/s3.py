"""One way to build an S3 client, shared by the artifact store and the registry.

Endpoint: SQUEEZEFLOW_S3_ENDPOINT, else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (boto3's own variables),
else AWS itself. Credentials: boto3's normal chain (environment, profile, instance role). The embedded
SeaweedFS server exports its endpoint and credentials into the environment of the process that uses it
(see services.py), so nothing here ever prints or stores a secret.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

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


def endpoint_url() -> str | None:
    return (os.environ.get("SQUEEZEFLOW_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL") or None)


def client(connect_timeout: float = 5.0, max_attempts: int = 5):
    """A boto3 S3 client with bounded retries (standard mode: exponential backoff on 5xx/throttling)."""
    import boto3
    from botocore.config import Config

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
    return boto3.client("s3", endpoint_url=endpoint_url(), region_name=region, config=cfg)


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
            raise BadInput(f"S3 access to bucket {loc.bucket!r} denied ({code}): check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY") from None
        raise BadInput(f"S3 bucket {loc.bucket!r} not usable: {code}") from None
    except (BotoCoreError, OSError) as e:
        raise BadInput(f"S3 endpoint {endpoint_url() or 'AWS'} unreachable ({type(e).__name__}); "
                       "check SQUEEZEFLOW_S3_ENDPOINT or start the embedded server") from None
