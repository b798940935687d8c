"""S3 credentials and the shared store from prefect-aws blocks, named on the command line or in a flow's
`destinations` parameter (so the Prefect UI form has a field for each):

    aws_credentials_block  an AwsCredentials (or MinIOCredentials) block: key, secret, session token,
                           region and, for SeaweedFS/MinIO, aws_client_parameters.endpoint_url. Used for
                           every S3 access of the run: registry, store, s3:// models and text sources.
    store_block            an S3Bucket block: the artifact store is s3://<bucket_name>/<bucket_folder>,
                           reached with the block's own credentials unless aws_credentials_block names
                           others (that one wins: one set of credentials per process).

"Result storage" here means the store. Prefect persists no task results in Squeezeflow (every flow and
task has persist_result=False): each stage's output is kept in our content-addressed store under a key
made of its inputs (squeezeflow/memo.py), which is what lets a rerun, a resumed run or another worker skip
finished stages. Workers that point at the same S3Bucket block therefore share one cache; pointing
Prefect's own result storage at the bucket would store nothing.

How the credentials reach boto3: they are exported into this process's environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION, SQUEEZEFLOW_S3_ENDPOINT), the same way the embedded
SeaweedFS hands over its own (services.py), so every client, thread and child process (a local Dask
cluster) built afterwards uses them. Only block names travel in parameters, logs and manifests; secrets
are never printed and never put in a message. SQUEEZEFLOW_S3_BLOCK (the block's name) marks the
environment as block-configured, so services.ensure_s3() does not replace it with the embedded server's.
"""
from __future__ import annotations

import os
import sys
from typing import Any

from .errors import BadInput

CREDENTIALS_ENV = "SQUEEZEFLOW_AWS_CREDENTIALS_BLOCK"   # default of --aws-credentials-block (e.g. on a worker)
STORE_ENV = "SQUEEZEFLOW_STORE_BLOCK"                   # default of --store-block
MARKER = "SQUEEZEFLOW_S3_BLOCK"
_ENDPOINT_VARS = ("SQUEEZEFLOW_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")

# The names applied in this process, so the CLI can hand the same names to the flow's parameters.
_applied: dict[str, str] = {}


def add_flags(p: Any, store: bool = True) -> None:
    """--aws-credentials-block (and --store-block) on a command that reaches S3."""
    p.add_argument("--aws-credentials-block", metavar="NAME", default=os.environ.get(CREDENTIALS_ENV) or None,
                   help=f"S3 credentials (and endpoint) from this prefect-aws AwsCredentials block "
                        f"(default: ${CREDENTIALS_ENV}, else the AWS_* environment)")
    if store:
        p.add_argument("--store-block", metavar="NAME", default=os.environ.get(STORE_ENV) or None,
                       help=f"artifact store (the stage cache workers share) = this prefect-aws S3Bucket block's "
                            f"bucket and folder, with its credentials (default: ${STORE_ENV})")


def apply_args(args: Any) -> None:
    """The CLI's side: load the blocks the command names (starting the embedded Prefect server if no API is
    configured: the blocks live there) before anything heavy; set args.store from a store block."""
    creds, store = getattr(args, "aws_credentials_block", None), getattr(args, "store_block", None)
    if not (creds or store):
        return
    if store and getattr(args, "store", None):
        raise BadInput("give --store or --store-block, not both")
    from .services import ensure_prefect, flush_prefect_events

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    ensure_prefect()
    try:
        uri = use(creds or "", store or "")
    finally:
        flush_prefect_events()
    if uri:
        args.store = uri



def destination_fields() -> dict[str, str]:
    """The block names applied in this process, as `Destinations` fields for the flow run."""
    return dict(_applied)


def use(credentials_block: str = "", store_block: str = "", store: str = "") -> str | None:
    """Apply the named blocks to this process; return the store URI of `store_block` (None without one).
    Called by the CLI and again at the start of each flow run (a worker's run has only the parameters)."""
    credentials_block, store_block = (credentials_block or "").strip(), (store_block or "").strip()
    if not (credentials_block or store_block):
        return None
    uri, creds, source = None, None, None
    if store_block:
        bucket = _load("S3Bucket", store_block, "--store-block")
        folder = (bucket.bucket_folder or "").strip("/")
        uri = f"s3://{bucket.bucket_name}/{folder}".rstrip("/")
        if store and store.rstrip("/") != uri:
            raise BadInput(f"store {store!r} and store block {store_block!r} ({uri}) disagree; give one")
        creds, source = bucket.credentials, f"S3Bucket block {store_block!r}"
    if credentials_block:
        creds, source = _load("AwsCredentials", credentials_block, "--aws-credentials-block"), \
            f"AwsCredentials block {credentials_block!r}"
    _export(creds, source)
    _applied.clear()
    _applied.update({k: v for k, v in (("aws_credentials_block", credentials_block),
                                       ("store_block", store_block)) if v})
    return uri


def source() -> str | None:
    """Where the S3 credentials came from, for error messages (a block's name), or None (environment)."""
    return os.environ.get(MARKER) or None


def _load(kind: str, name: str, flag: str) -> Any:
    try:
        import prefect_aws
    except ImportError:
        raise BadInput(f"{flag} needs prefect-aws (pip install prefect-aws)") from None
    cls = getattr(prefect_aws, kind)
    try:
        return cls.load(name)
    except ValueError:  # Prefect's "Unable to find block document named ..."
        raise BadInput(f"{flag}: no {kind} block named {name!r} on the Prefect server "
                       f"({os.environ.get('PREFECT_API_URL') or 'embedded'}); create it first") from None
    except Exception as e:  # the API is unreachable or refuses; its message is not needed (nor safe to echo)
        raise BadInput(f"{flag}: cannot read {kind} block {name!r} ({type(e).__name__}); "
                       "check PREFECT_API_URL") from None


def _secret(value: Any) -> str | None:
    return value.get_secret_value() if hasattr(value, "get_secret_value") else value


def _export(creds: Any, source: str) -> None:
    """Put the block's settings where boto3 (and child processes) read them; see the module docstring."""
    if creds is None:
        return
    if getattr(creds, "assume_role_arn", None):
        raise BadInput(f"{source}: assume_role_arn is not supported; give the role's keys or a profile_name")
    if hasattr(creds, "minio_root_user"):
        key, secret, token, profile = creds.minio_root_user, _secret(creds.minio_root_password), None, None
    else:
        key, secret = creds.aws_access_key_id, _secret(creds.aws_secret_access_key)
        token, profile = _secret(creds.aws_session_token), creds.profile_name
    if bool(key) != bool(secret):
        raise BadInput(f"{source} has an access key id without a secret (or the reverse); fill in both")
    params = creds.aws_client_parameters
    endpoint = str(params.endpoint_url) if params is not None and params.endpoint_url else None
    if not (key or profile or token or endpoint or creds.region_name):
        return  # an S3Bucket block with empty credentials: the environment's stay in force
    env = os.environ
    if key:
        env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"] = key, secret
        env.pop("AWS_PROFILE", None)
    elif profile:  # keys in the environment would win over the profile
        env["AWS_PROFILE"] = profile
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.pop(var, None)
    if token:
        env["AWS_SESSION_TOKEN"] = token
    else:  # a token left from other credentials makes every request fail its signature check
        env.pop("AWS_SESSION_TOKEN", None)
    if creds.region_name:
        env["AWS_REGION"] = creds.region_name
    for var in _ENDPOINT_VARS:  # the block decides the endpoint: none given means AWS itself
        env.pop(var, None)
    if endpoint:
        env["SQUEEZEFLOW_S3_ENDPOINT"] = endpoint
    env[MARKER] = source
    if "boto3" in sys.modules:  # boto3's default session caches the credentials it resolved first
        sys.modules["boto3"].DEFAULT_SESSION = None
