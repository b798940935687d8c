"""Transient failures are retried; configuration and integrity errors are not."""
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from prefect.states import Failed

from squeezeflow.errors import BadInput, IntegrityError
from squeezeflow.tasks._stage import is_transient


def _client_error(status: int) -> ClientError:
    return ClientError({"Error": {"Code": str(status)}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")


@pytest.mark.parametrize("exc,retry", [
    (BadInput("bits must be between 2 and 8"), False),
    (IntegrityError("corrupted"), False),
    (ValueError("bad"), False),
    (_client_error(403), False),
    (_client_error(503), True),
    (_client_error(429), True),
    (EndpointConnectionError(endpoint_url="http://127.0.0.1:9"), True),
    (ConnectionResetError(), True),
    (TimeoutError(), True),
])
def test_retry_only_transient(exc, retry):
    assert is_transient(None, None, Failed(data=exc)) is retry
