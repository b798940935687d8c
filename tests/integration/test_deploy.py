"""`squeezeflow deploy` registers the compress flow with a typed parameter form for the Prefect UI."""
import pytest

from prefect_fixtures import prefect_server, shared_inputs  # noqa: F401  (fixtures)

pytestmark = pytest.mark.integration


def test_deployment_has_typed_parameter_schema(prefect_server):
    from prefect import get_client

    from squeezeflow.flows.deployments import deploy_compress

    dep_id = deploy_compress(pool="test-deploy-pool", name="compress-schema-test")
    with get_client(sync_client=True) as client:
        dep = client.read_deployment(dep_id)
        pool = client.read_work_pool("test-deploy-pool")
    assert pool.type == "process"
    schema = dep.parameter_openapi_schema
    assert set(schema["properties"]) == {"model", "recipe", "calibration", "evaluation", "destinations"}
    defs = schema["definitions"]
    calib = defs["CalibrationSpec"]["properties"]
    assert calib["n_samples"]["type"] == "integer" and calib["n_samples"]["minimum"] == 1
    assert calib["seqlen"]["minimum"] == 16
    assert defs["ModelRef"]["properties"]["trust_remote_code"]["default"] is False
    assert dep.entrypoint == "flows/compress.py:compress_flow"
