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
    assert set(schema["properties"]) == {"model", "recipe", "calibration", "evaluation", "compute", "destinations"}
    defs = schema["definitions"]
    assert set(defs["ComputeSpec"]["properties"]) >= {"device", "dtype"}  # the UI form offers the compute setting
    calib = defs["CalibrationSpec"]["properties"]
    assert calib["n_samples"]["type"] == "integer" and calib["n_samples"]["minimum"] == 1
    assert calib["seqlen"]["minimum"] == 16
    assert defs["ModelRef"]["properties"]["trust_remote_code"]["default"] is False
    assert dep.entrypoint == "flows/compress.py:compress_flow"


def _enum_choices(prop: dict) -> list:
    """The dropdown's choices of an anyOf [enum, free string] property (the free branch must exist too)."""
    branches = prop["anyOf"]
    assert any(b.get("type") == "string" and "enum" not in b for b in branches), prop
    return next(b["enum"] for b in branches if "enum" in b)


def test_compress_form_offers_recipes_and_calibration_sources(prefect_server):
    from prefect import get_client

    from squeezeflow.config import NAMED_SPLITS
    from squeezeflow.recipes import PRESET_EXAMPLES
    from squeezeflow.flows.deployments import deploy_compress

    dep_id = deploy_compress(pool="test-deploy-pool", name="compress-choices-test")
    with get_client(sync_client=True) as client:
        schema = client.read_deployment(dep_id).parameter_openapi_schema
    recipe = schema["properties"]["recipe"]
    assert _enum_choices(recipe) == list(PRESET_EXAMPLES)
    assert recipe["default"] == "rtn-w4g64" and recipe["description"]
    source = schema["definitions"]["CalibrationSpec"]["properties"]["source"]
    assert _enum_choices(source) == list(NAMED_SPLITS) and source["description"]
    assert schema["definitions"]["CalibrationSpec"]["properties"]["n_samples"]["maximum"] == 100_000


def test_deploy_registers_compress_sweep_and_nightly(prefect_server, capsys):
    from prefect import get_client

    from squeezeflow.cli import main
    from squeezeflow.flows.deployments import RECALIBRATE

    assert main(["deploy", "--pool", "test-deploy-all", "--nightly-cron", "30 1 * * *", "--json"]) == 0
    import json

    out = json.loads(capsys.readouterr().out)["deployments"]
    with get_client(sync_client=True) as client:
        compress = client.read_deployment(out["compress"]["id"])
        sweep = client.read_deployment(out["sweep"]["id"])
        assert (compress.name, compress.work_pool_name) == ("compress", "test-deploy-all")
        assert sweep.entrypoint == "flows/sweep.py:sweep_flow"
        assert _enum_choices(sweep.parameter_openapi_schema["properties"]["recipes"]["items"])
        assert not compress.schedules and not sweep.schedules
        nightly = client.read_deployment(out["recalibrate-nightly"]["id"])
    assert nightly.entrypoint == RECALIBRATE.entrypoint and nightly.work_pool_name == "test-deploy-all"
    assert [s.schedule.cron for s in nightly.schedules] == ["30 1 * * *"]
