"""The flows' `destinations` parameter: where results go, and which prefect-aws blocks reach S3."""
from __future__ import annotations

import os

from pydantic import BaseModel, Field


class Destinations(BaseModel):
    """Where results go. Empty = the defaults (local store in the cache, embedded S3 registry)."""

    store: str = Field("", description="Artifact store: local directory or s3://bucket/prefix")
    registry: str = Field("", description="Registry: s3://bucket/prefix; empty = embedded SeaweedFS")
    publish: bool = True
    max_shard_size: str = Field("5GB", pattern=r"^\s*\d+(\.\d+)?\s*([KMGTkmgt][iI]?[bB]|[bB])?\s*$",
                                description="Largest packed weight file (5GB, 2GiB...); a larger model is sharded "
                                "with an index file, as transformers writes it")
    # Block names only: the secrets stay in the blocks (squeezeflow/aws_blocks.py), never in parameters.
    aws_credentials_block: str = Field("", description="prefect-aws AwsCredentials block for S3 (registry, store, "
                                       "s3:// sources); empty = the worker's AWS_* environment")
    store_block: str = Field("", description="prefect-aws S3Bucket block whose bucket/folder is the artifact store "
                             "(the stage cache workers share); empty = the store field")

    def apply_blocks(self) -> str:
        """Load the named blocks into this run's process; the store URI (store, else the store block's).
        Empty fields fall back to the worker's $SQUEEZEFLOW_AWS_CREDENTIALS_BLOCK / $SQUEEZEFLOW_STORE_BLOCK,
        so every worker of a pool can be pointed at one shared store without each run naming it."""
        from squeezeflow import aws_blocks

        creds = self.aws_credentials_block or os.environ.get(aws_blocks.CREDENTIALS_ENV, "")
        store_block = self.store_block or ("" if self.store else os.environ.get(aws_blocks.STORE_ENV, ""))
        return aws_blocks.use(creds, store_block, self.store) or self.store
