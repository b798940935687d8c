"""Registry trust against a real SeaweedFS server: what someone who can write to the bucket cannot do.

Anyone with write access can publish a self-consistent entry and move an alias; with signatures required
(SQUEEZEFLOW_REQUIRE_SIGNATURE / --require-signature) pull, `squeezeflow.load` and promote refuse every
entry not signed by a trusted key, and a manifest changed after signing is refused even without the
requirement. Independently of signatures: a manifest without its content id, an alias pointing to
another model's entry, and planted terminal escapes are refused or neutralized; a malformed alias is
repaired by the next move and a bad object never breaks `registry list`. Each tampering case is counted
("tampering refused") in the test summary.
"""
from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest

import squeezeflow
from prefect_fixtures import prefect_server  # noqa: F401  (fixture by name; only the Secret block test starts it)
from squeezeflow.cli import main
from squeezeflow.errors import BadInput, IntegrityError, UntrustedEntry
from squeezeflow.models import pull_artifact
from squeezeflow.registry import Registry, content_id
from squeezeflow.signing import SIGNATURE, generate_keypair
from squeezeflow.store import canonical_json, sha256_bytes
from sf_testing import tally
from test_registry import MODEL, RECIPE, all_objects, make_artifact

pytestmark = pytest.mark.integration

ESC = "\x1b"
SCREEN_ATTACK = "\x1b[2J\x1b[H\x1b[32mOK\x1b[0m\r\b\u202e"  # clear screen, home, green "OK", CR, BS, bidi


def authentic(root: Path, seed: int, model: str = MODEL, recipe: str = RECIPE) -> tuple[Path, str]:
    """A small artifact whose manifest names itself as the pipeline's do (lineage, content id)."""
    make_artifact(root, seed)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest.update(model=model, recipe=recipe, lineage={"model": {"name": model}, "recipe": {"name": recipe}})
    manifest["artifact_id"] = content_id(manifest["files"], manifest["lineage"])
    (root / "manifest.json").write_bytes(canonical_json(manifest))
    return root, manifest["artifact_id"]


@pytest.fixture
def keys(tmp_path: Path) -> dict:
    """Two key pairs on disk: `ours` (the publisher consumers trust) and `theirs` (an attacker's)."""
    out = {}
    for name in ("ours", "theirs"):
        private, public, kid = generate_keypair()
        (tmp_path / f"{name}.pem").write_bytes(private)
        (tmp_path / f"{name}.pub.pem").write_bytes(public)
        out[name] = {"private": tmp_path / f"{name}.pem", "public": tmp_path / f"{name}.pub.pem", "id": kid,
                     "pem": private}
    return out


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, registry: Registry, tmp_path: Path):
    """Signature settings start unset; SQUEEZEFLOW_REGISTRY names the test's registry (for refs)."""
    for var in ("SQUEEZEFLOW_SIGNING_KEY", "SQUEEZEFLOW_SIGNING_KEY_BLOCK", "SQUEEZEFLOW_TRUSTED_KEYS",
                "SQUEEZEFLOW_REQUIRE_SIGNATURE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SQUEEZEFLOW_REGISTRY", registry.uri)
    monkeypatch.setenv("SQUEEZEFLOW_SCRATCH", str(tmp_path / "scratch"))
    return monkeypatch


def publish(registry: Registry, env, root: Path, seed: int, key: dict | None, alias: str | None = "latest",
            model: str = MODEL):
    """Publish as a publisher holding `key` (None: as someone without a key)."""
    if key is None:
        env.delenv("SQUEEZEFLOW_SIGNING_KEY", raising=False)
    else:
        env.setenv("SQUEEZEFLOW_SIGNING_KEY", str(key["private"]))
    path, aid = authentic(root, seed, model=model)
    entry = Registry(registry.uri).publish(path, model, RECIPE, aid, alias=alias)
    env.delenv("SQUEEZEFLOW_SIGNING_KEY", raising=False)
    return entry


def consumer(env, keys: dict, require: bool = True) -> None:
    env.setenv("SQUEEZEFLOW_TRUSTED_KEYS", str(keys["ours"]["public"]))
    env.setenv("SQUEEZEFLOW_REQUIRE_SIGNATURE", "1" if require else "0")


def key_of(registry: Registry, entry, rel: str) -> str:
    return registry.loc.key("models", entry.model, entry.recipe, entry.artifact_id, rel)


def put(registry: Registry, key: str, body: bytes) -> None:
    registry._c.put_object(Bucket=registry.loc.bucket, Key=key, Body=body)


def refused(label_ok: bool) -> None:
    tally("tampering refused", label_ok)
    assert label_ok


def all_refuse(registry: Registry, entry, ref: str, tmp_path: Path, match: str) -> None:
    """pull, squeezeflow.load and promote all refuse the entry (UntrustedEntry matching `match`), and so
    does the CLI, in one line with exit status 2; nothing is left on disk."""
    dest = tmp_path / "pulled"
    for what, attempt in (("pull", lambda: Registry(registry.uri).pull(ref, dest)),
                          ("load", lambda: squeezeflow.load(ref)),
                          ("promote", lambda: Registry(registry.uri).promote(entry.uri, "production"))):
        with pytest.raises(UntrustedEntry, match=match) as e:
            attempt()
        refused(ESC not in str(e.value) and not dest.exists())
    return None


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --- signatures --------------------------------------------------------------------------------------

def test_signed_entry_is_accepted_and_the_private_key_is_never_stored(registry, env, keys, tmp_path, capsys):
    entry = publish(registry, env, tmp_path / "a", 1, keys["ours"])
    sig = json.loads(registry._get(key_of(registry, entry, SIGNATURE)))
    assert sig["key_id"] == keys["ours"]["id"] and sig["algorithm"] == "ed25519"
    stored = b"".join(registry._get(k) for k in all_objects(registry))
    body = b"".join(keys["ours"]["pem"].splitlines()[1:-1])  # the base64 key material itself
    assert keys["ours"]["pem"] not in stored and body not in stored

    consumer(env, keys)
    dest = Registry(registry.uri).pull(f"{MODEL}/{RECIPE}@latest", tmp_path / "pulled")
    assert (dest / SIGNATURE).read_bytes() == registry._get(key_of(registry, entry, SIGNATURE))
    assert pull_artifact(f"{MODEL}/{RECIPE}@latest").is_dir()  # the load path
    assert Registry(registry.uri).promote(entry.uri, "production") == entry
    shown = Registry(registry.uri).show(entry.uri)["signature"]
    assert shown == {"key_id": keys["ours"]["id"], "verified": True}
    # The pulled directory re-verifies, signature included.
    assert squeezeflow.registry.verify_dir(dest, trust=Registry(registry.uri).trust)["artifact_id"] == entry.artifact_id
    code, out, err = cli(capsys, "registry", "pull", entry.uri, "--dest", str(tmp_path / "cli"),
                         "--registry", registry.uri, "--require-signature")
    assert code == 0 and err == "" and out.strip() == str(tmp_path / "cli")


def test_forged_unsigned_entry_is_refused_when_signatures_are_required(registry, env, keys, tmp_path, capsys):
    # Someone with bucket access but no key publishes a consistent entry and moves latest to it.
    entry = publish(registry, env, tmp_path / "forged", 1, None)
    consumer(env, keys)
    all_refuse(registry, entry, f"{MODEL}/{RECIPE}@latest", tmp_path, "not signed")
    code, _, err = cli(capsys, "registry", "pull", f"{MODEL}/{RECIPE}@latest", "--dest", str(tmp_path / "c"),
                       "--registry", registry.uri)
    refused(code == 2 and err.count("\n") == 1 and "not signed" in err)
    # Without the requirement the same entry is accepted: signatures are optional by default.
    env.setenv("SQUEEZEFLOW_REQUIRE_SIGNATURE", "0")
    optional = Registry(registry.uri).pull(entry.uri, tmp_path / "optional")
    assert optional.is_dir()
    # Loading that unsigned copy from disk with require_signature=True is refused before any weight is read.
    with pytest.raises(UntrustedEntry, match="not signed"):
        squeezeflow.load(str(optional), require_signature=True)
    refused(True)
    # ... and the flag turns the requirement on per command.
    code, _, err = cli(capsys, "registry", "promote", entry.uri, "--alias", "production", "--registry",
                       registry.uri, "--require-signature")
    refused(code == 2 and "not signed" in err and err.count("\n") == 1)


def test_entry_signed_by_an_untrusted_key_is_refused(registry, env, keys, tmp_path):
    entry = publish(registry, env, tmp_path / "a", 1, keys["theirs"])
    consumer(env, keys)
    all_refuse(registry, entry, entry.uri, tmp_path, f"key '{keys['theirs']['id']}', which is not trusted")
    # A garbage signature file is no better than none.
    put(registry, key_of(registry, entry, SIGNATURE), b"\x00not a signature")
    with pytest.raises(UntrustedEntry, match="malformed"):
        Registry(registry.uri).pull(entry.uri, tmp_path / "p")
    refused(True)


def test_manifest_changed_after_signing_is_refused_even_when_signatures_are_optional(registry, env, keys, tmp_path):
    entry = publish(registry, env, tmp_path / "a", 1, keys["ours"])
    # Metrics are not part of the content id: an edit there keeps the manifest self-consistent.
    manifest = json.loads(registry._get(key_of(registry, entry, "manifest.json")))
    manifest["metrics"]["perplexity"]["moby-dick"] = 1.0
    put(registry, key_of(registry, entry, "manifest.json"), canonical_json(manifest))
    consumer(env, keys, require=False)
    all_refuse(registry, entry, entry.uri, tmp_path, "does not match the manifest")
    # A valid signature moved onto another entry does not sign it.
    other = publish(registry, env, tmp_path / "b", 2, None, alias=None)
    put(registry, key_of(registry, other, SIGNATURE), registry._get(key_of(registry, entry, SIGNATURE)))
    with pytest.raises(UntrustedEntry, match="does not match the manifest"):
        Registry(registry.uri).pull(other.uri, tmp_path / "p")
    refused(True)
    # Nor does a signed manifest copied, with its signature, under another entry's path.
    third = publish(registry, env, tmp_path / "c", 3, keys["ours"], alias=None)
    for rel in ("manifest.json", SIGNATURE):
        put(registry, key_of(registry, other, rel), registry._get(key_of(registry, third, rel)))
    with pytest.raises(UntrustedEntry, match="points elsewhere"):
        Registry(registry.uri).pull(other.uri, tmp_path / "p")
    refused(True)


def test_required_signature_without_trusted_keys_is_one_line_before_any_download(registry, env, keys, tmp_path, capsys):
    env.setenv("SQUEEZEFLOW_REQUIRE_SIGNATURE", "1")
    code, _, err = cli(capsys, "registry", "pull", "m/r@latest", "--dest", str(tmp_path / "d"),
                       "--registry", "s3://nowhere-bucket/x")
    assert code == 2 and "no key is trusted" in err and err.count("\n") == 1
    env.setenv("SQUEEZEFLOW_REQUIRE_SIGNATURE", "maybe")
    with pytest.raises(BadInput, match="SQUEEZEFLOW_REQUIRE_SIGNATURE"):
        Registry(registry.uri).trust
    env.setenv("SQUEEZEFLOW_REQUIRE_SIGNATURE", "1")
    env.setenv("SQUEEZEFLOW_TRUSTED_KEYS", str(keys["ours"]["private"]))  # a private key is not a public one
    with pytest.raises(BadInput, match="not a PEM public key"):
        Registry(registry.uri).trust


def test_a_bad_signing_key_is_one_line_that_never_quotes_it(registry, env, keys, tmp_path):
    path, aid = authentic(tmp_path / "a", 1)
    secret_looking = "AAAAC3NzaC1lZDI1NTE5AAAAIKx-not-a-path-but-maybe-a-secret"
    env.setenv("SQUEEZEFLOW_SIGNING_KEY", secret_looking)
    with pytest.raises(BadInput) as e:
        registry.publish(path, MODEL, RECIPE, aid)
    assert secret_looking not in str(e.value) and "SQUEEZEFLOW_SIGNING_KEY" in str(e.value)
    env.setenv("SQUEEZEFLOW_SIGNING_KEY", keys["ours"]["pem"].decode().replace("A", "B", 5))
    with pytest.raises(BadInput) as e:
        registry.publish(path, MODEL, RECIPE, aid)
    assert "BEGIN" not in str(e.value)
    assert all_objects(registry) == {}  # refused before any upload


def test_keygen_writes_a_private_key_only_its_owner_can_read(registry, env, tmp_path, capsys):
    code, out, err = cli(capsys, "registry", "keygen", "--dest", str(tmp_path / "keys"))
    assert code == 0, err
    private, public = tmp_path / "keys" / "signing-key.pem", tmp_path / "keys" / "signing-key.pub.pem"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert "PRIVATE KEY" not in out and private.read_text().splitlines()[1] not in out
    assert cli(capsys, "registry", "keygen", "--dest", str(tmp_path / "keys"))[0] == 2  # never overwrites
    # The pair works end to end: sign with the file, verify with the public file given on the command line.
    env.setenv("SQUEEZEFLOW_SIGNING_KEY", str(private))
    path, aid = authentic(tmp_path / "a", 1)
    entry = Registry(registry.uri).publish(path, MODEL, RECIPE, aid)
    env.delenv("SQUEEZEFLOW_SIGNING_KEY")
    code, out, err = cli(capsys, "registry", "pull", entry.uri, "--dest", str(tmp_path / "p"), "--registry",
                         registry.uri, "--require-signature", "--trusted-key", str(public))
    assert code == 0, err


# --- authenticity without signatures -----------------------------------------------------------------

def test_pull_refuses_a_manifest_without_its_content_id(registry, env, tmp_path, capsys):
    art = make_artifact(tmp_path / "plain")  # hashes listed, but no artifact_id / lineage
    entry = registry.publish(art, MODEL, RECIPE, "a1")
    dest = tmp_path / "pulled"
    with pytest.raises(UntrustedEntry, match="no artifact_id"):
        registry.pull(entry.uri, dest)
    refused(not dest.exists())
    code, _, err = cli(capsys, "registry", "pull", entry.uri, "--dest", str(dest), "--registry", registry.uri)
    refused(code == 2 and "no artifact_id" in err and not dest.exists())
    # An artifact id that is not the content id of what the manifest lists is refused too.
    path, aid = authentic(tmp_path / "b", 2)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["artifact_id"] = "0123456789abcdef"
    (path / "manifest.json").write_bytes(canonical_json(manifest))
    other = registry.publish(path, MODEL, RECIPE, "0123456789abcdef", alias=None)
    with pytest.raises(UntrustedEntry, match="not the content id"):
        registry.pull(other.uri, dest)
    refused(not dest.exists())


def test_alias_pointing_to_another_models_entry_is_refused(registry, env, tmp_path, capsys):
    ours = publish(registry, env, tmp_path / "a", 1, None)
    theirs = publish(registry, env, tmp_path / "b", 2, None, model="other-model")
    pointer = {"uri": theirs.uri, "artifact_id": theirs.artifact_id, "seq": 2, "updated": "now",
               "previous": None, "history": []}
    put(registry, registry._alias_key(MODEL, RECIPE, "latest"), canonical_json(pointer))
    for ref in (f"{MODEL}/{RECIPE}@latest", f"{MODEL}/{RECIPE}"):
        with pytest.raises(UntrustedEntry, match="another model/recipe"):
            registry.pull(ref, tmp_path / "p")
        refused(not (tmp_path / "p").exists())
    with pytest.raises(UntrustedEntry, match="another model/recipe"):
        squeezeflow.load(f"{MODEL}/{RECIPE}@latest")
    refused(True)
    code, _, err = cli(capsys, "registry", "pull", f"{MODEL}/{RECIPE}@latest", "--dest", str(tmp_path / "p"),
                       "--registry", registry.uri)
    refused(code == 2 and err.count("\n") == 1 and "repair" in err)
    # The alias's own model/recipe can still be reached by id, and a promote repairs the alias.
    assert registry.pull(ours.uri, tmp_path / "ok").is_dir()
    registry.promote(ours.uri, "latest")
    assert registry.resolve(f"{MODEL}/{RECIPE}@latest") == ours.uri


def test_planted_terminal_escapes_never_reach_the_terminal(registry, env, tmp_path, capsys, caplog):
    path, aid = authentic(tmp_path / "a", 1)
    entry = registry.publish(path, MODEL, RECIPE, aid)
    # An attacker rewrites the manifest to list a file whose name is a screen-clearing escape sequence ...
    manifest = json.loads((path / "manifest.json").read_text())
    evil = f"{SCREEN_ATTACK}.safetensors"
    manifest["files"][evil] = {"sha256": sha256_bytes(b"x"), "size": 1}
    put(registry, key_of(registry, entry, "manifest.json"), canonical_json(manifest))
    put(registry, key_of(registry, entry, evil), b"x")
    # ... and plants metrics names and values that would print escapes in `registry list`.
    other = publish(registry, env, tmp_path / "b", 2, None, alias=None)
    manifest = json.loads(registry._get(key_of(registry, other, "manifest.json")))
    manifest["metrics"]["perplexity"] = {f"moby{SCREEN_ATTACK}": 1.0, "sotu": SCREEN_ATTACK}
    put(registry, key_of(registry, other, "manifest.json"), canonical_json(manifest))
    with pytest.raises(IntegrityError) as e:
        registry.pull(entry.uri, tmp_path / "p")
    refused(ESC not in str(e.value) and "\\x1b[2J" in str(e.value) and "\u202e" not in str(e.value))
    for argv in (["registry", "pull", entry.uri, "--dest", str(tmp_path / "p")], ["registry", "list"],
                 ["registry", "show", entry.uri], ["registry", "show", other.uri], ["--json", "registry", "list"]):
        code, out, err = cli(capsys, *argv, "--registry", registry.uri)
        refused(not any(c in out + err for c in (ESC, "\r", "\b", "\u202e")))
        if argv == ["registry", "list"]:
            assert code == 0 and "moby\\x1b[2J" in out and other.uri in out
    # Text in alias pointers and history records is escaped too.
    pointer = json.loads(registry._get(registry._alias_key(MODEL, RECIPE, "latest")))
    pointer["updated"] = SCREEN_ATTACK
    put(registry, registry._alias_key(MODEL, RECIPE, "latest"), canonical_json(pointer))
    code, out, err = cli(capsys, "registry", "history", f"{MODEL}/{RECIPE}@latest", "--registry", registry.uri)
    refused(code == 0 and "\\x1b[2J" in out and ESC not in out + err)
    put(registry, registry._alias_key(MODEL, RECIPE, f"x{SCREEN_ATTACK}"), b"{}")
    with caplog.at_level(logging.WARNING, logger="squeezeflow.registry"):
        registry.list()
    refused(any("skipped alias" in r.getMessage() for r in caplog.records)
            and not any(ESC in r.getMessage() for r in caplog.records))


# --- malformed aliases and entries -------------------------------------------------------------------

@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'"just a string"', b"\xff\xfe",
                                  {"seq": "7"}, {"seq": -3}, {"seq": True}, {"seq": 1.5}, {"seq": 10**12},
                                  {"history": "not a list"}, {"artifact_id": "someone-else"},
                                  {"uri": "s3://elsewhere/models/m/r/x"}],
                         ids=["not-json", "a-list", "a-string", "not-utf8", "seq-string", "seq-negative",
                              "seq-bool", "seq-float", "seq-huge", "history-string", "wrong-id", "foreign-uri"])
def test_a_malformed_alias_is_refused_listed_around_and_repaired_by_the_next_move(registry, env, tmp_path, body, caplog):
    e0 = publish(registry, env, tmp_path / "a", 1, None, alias=None)
    e1 = publish(registry, env, tmp_path / "b", 2, None, alias=None)
    registry.promote(e0.uri, "production")
    registry.promote(e1.uri, "production")  # logs move 1
    key = registry._alias_key(MODEL, RECIPE, "production")
    if isinstance(body, dict):
        body = canonical_json({**json.loads(registry._get(key)), **body})
    put(registry, key, body)

    with pytest.raises(UntrustedEntry, match="promote an entry"):
        registry.resolve(f"{MODEL}/{RECIPE}@production")
    refused(True)
    with caplog.at_level(logging.WARNING, logger="squeezeflow.registry"):
        listed = registry.list()  # one bad alias hides only itself
    assert [e["aliases"] for e in listed] == [[], []]
    assert any("skipped alias" in r.getMessage() for r in caplog.records)

    registry.promote(e0.uri, "production")  # the repair
    assert registry.resolve(f"{MODEL}/{RECIPE}@production") == e0.uri
    moves = registry.history(MODEL, RECIPE, "production")
    assert [h["seq"] for h in moves] == [1, 2] and moves[-1]["artifact_id"] == e0.artifact_id
    registry.promote(e1.uri, "production")  # and the history goes on from there
    assert [h["seq"] for h in registry.history(MODEL, RECIPE, "production")] == [1, 2, 3]


def test_list_survives_bad_entries(registry, env, tmp_path, capsys):
    good = publish(registry, env, tmp_path / "a", 1, None)
    base = registry.loc.key("models", MODEL, RECIPE)
    put(registry, f"{base}/garbage/manifest.json", b"\x00\x01 not json")
    put(registry, f"{base}/nofiles/manifest.json", b'{"metrics": {}}')
    put(registry, f"{base}/badmetrics/manifest.json", canonical_json({"files": {}, "metrics": ["x"]}))
    put(registry, f"{registry.loc.key('models', MODEL)}/{SCREEN_ATTACK}/id/manifest.json", b"{}")
    put(registry, f"{base}/deep/report/manifest.json", b"{}")  # not an entry at all
    put(registry, registry.loc.key("alias-history", MODEL, RECIPE, "latest", "0000000009.json"), b"[]")
    listed = registry.list()
    assert [e["uri"] for e in listed if e["uri"] == good.uri] == [good.uri]
    assert {e["artifact_id"]: e["metrics"] for e in listed}["badmetrics"] == {}
    assert "garbage" not in {e["artifact_id"] for e in listed}
    code, out, err = cli(capsys, "registry", "list", "--registry", registry.uri)
    refused(code == 0 and good.uri in out and ESC not in out + err)
    assert registry.history(MODEL, RECIPE, "latest")[-1]["uri"] == good.uri  # the bad record is skipped
    # A well-numbered record with malformed fields is shown with them neutralized, not a traceback.
    put(registry, registry.loc.key("alias-history", MODEL, RECIPE, "latest", "0000000008.json"),
        canonical_json({"seq": 8, "uri": good.uri, "previous": "not a pointer", "updated": 5}))
    for argv in (["registry", "history", f"{MODEL}/{RECIPE}@latest"], ["registry", "promote", good.uri, "--alias", "latest"]):
        code, out, err = cli(capsys, *argv, "--registry", registry.uri)
        refused(code == 0 and "Traceback" not in err)


# --- destinations ------------------------------------------------------------------------------------

def test_dest_under_a_file_or_through_a_symlink_is_one_line(registry, env, tmp_path, capsys):
    path, aid = authentic(tmp_path / "a", 1)
    entry = registry.publish(path, MODEL, RECIPE, aid)
    (tmp_path / "file").write_text("x")
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    (tmp_path / "dangling").symlink_to(tmp_path / "nothing")
    for dest, why in ((tmp_path / "file" / "sub", "is a file"), (tmp_path / "link", "is a symlink"),
                      (tmp_path / "link" / "sub", "is a symlink"), (tmp_path / "dangling" / "x", "is a symlink")):
        with pytest.raises(BadInput, match=why):
            registry.pull(entry.uri, dest)
        code, _, err = cli(capsys, "registry", "pull", entry.uri, "--dest", str(dest), "--registry", registry.uri)
        assert code == 2 and err.count("\n") == 1 and why in err, err
    assert list(target.iterdir()) == []  # nothing was written through the link
    assert registry.pull(entry.uri, target / "real").is_dir()  # the real path is fine


# --- the signing key from a Prefect Secret block -----------------------------------------------------

def test_signing_key_from_a_prefect_secret_block(prefect_server, registry, env, keys, tmp_path):
    from prefect.blocks.system import Secret

    Secret(value=keys["ours"]["pem"].decode()).save("registry-signing-key", overwrite=True)
    env.setenv("SQUEEZEFLOW_SIGNING_KEY_BLOCK", "registry-signing-key")
    path, aid = authentic(tmp_path / "a", 1)
    entry = Registry(registry.uri).publish(path, MODEL, RECIPE, aid)
    assert json.loads(registry._get(key_of(registry, entry, SIGNATURE)))["key_id"] == keys["ours"]["id"]
    env.setenv("SQUEEZEFLOW_SIGNING_KEY_BLOCK", "no-such-block")
    with pytest.raises(BadInput, match="no Prefect Secret block"):
        Registry(registry.uri).publish(path, MODEL, RECIPE, aid)
    env.delenv("SQUEEZEFLOW_SIGNING_KEY_BLOCK")
    consumer(env, keys)
    assert Registry(registry.uri).pull(entry.uri, tmp_path / "p").is_dir()

