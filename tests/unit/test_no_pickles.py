"""No stored record is ever unpickled: Prefect may honour a record's own `"serializer": {"type": "pickle"}`
on a cache hit, so no stage task persists or reads a Prefect result at all; stage results are remembered
as JSON in our store (squeezeflow/memo.py), read back through pydantic, never through pickle."""
import pickle

import pytest
from prefect.cache_policies import NO_CACHE

from sf_testing import tally


def all_tasks():
    from squeezeflow.tasks import gate
    from squeezeflow.tasks.stages import TASKS

    return {**{f"stage {k}": t for k, t in TASKS.items()}, "stamp-gate": gate.stamp_gate,
            "publish-candidate": gate.publish_candidate}


@pytest.mark.parametrize("name", sorted(all_tasks()))
def test_stage_task_persists_and_reads_no_prefect_record(name):
    task = all_tasks()[name]
    ok = task.persist_result is False and task.cache_policy is NO_CACHE
    tally("stage tasks that persist or read no Prefect record (records that could unpickle: 0)", ok)
    assert ok, (task.persist_result, task.cache_policy)


def test_a_planted_pickle_in_our_store_is_refused_not_run(tmp_path, monkeypatch):
    from squeezeflow import memo
    from squeezeflow.store import LocalStore, Ref

    ran = []
    monkeypatch.setattr("builtins.exec", lambda *a, **k: ran.append(a))
    store = LocalStore(tmp_path / "store")
    key = memo.stage_key("pack", {"x": 1})
    store.put_index(key, store.put_bytes(pickle.dumps({"payload": 1}), kind="stage-result"))
    from squeezeflow.errors import IntegrityError

    with pytest.raises(IntegrityError, match="not what that stage writes"):
        memo.lookup(store, key, Ref)
    ok = not ran
    tally("stage tasks that persist or read no Prefect record (records that could unpickle: 0)", ok)
    assert ok
