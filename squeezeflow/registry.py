"""The S3 artifact registry: immutable entries, movable aliases, verified pulls.

Layout under s3://BUCKET/PREFIX:
    models/<model>/<recipe>/<artifact_id>/...            one packed artifact directory per entry
    models/<model>/<recipe>/<artifact_id>/manifest.json  written LAST: an entry exists iff it does
    aliases/<model>/<recipe>/<alias>.json                {"uri", "artifact_id", "updated", "seq", "previous",
                                                          "history" (the last 20 moves)}
    alias-history/<model>/<recipe>/<alias>/<seq>.json    one record per alias move, never rewritten

Entries never change once their manifest is written. Aliases (`latest`, `production`, ...) move with
conditional writes (If-Match on the ETag read, If-None-Match when absent), so two concurrent promotions
both land, one after the other. Every move gets a sequence number in the pointer, and the full history
is an append-only log of create-only records (see `_move_alias` for why no move can go missing).

Refs accepted everywhere: an entry's s3:// URI, "model/recipe/artifact_id", "model/recipe@alias", or
"model/recipe" (meaning @latest).
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from .errors import BadInput, IntegrityError
from .s3 import S3Location, client, endpoint_url
from .store import canonical_json, sha256_file

MANIFEST = "manifest.json"
METRICS_FILE = "report/metrics.json"
# The artifact store marks materialized directories with this file; it is bookkeeping, not content.
IGNORED_FILES = frozenset({".squeezeflow-complete"})
ALIAS_HISTORY = 20
MAX_PUT_BYTES = 5 * 1024**3  # S3's single-PUT limit
# ':' is allowed for recipe names such as nowag-p2:4 (N:M pruning); it is a plain character in S3 keys.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+:-]{0,127}$")


class ImmutableEntryError(BadInput):
    """An entry with this id already exists (or is being written) with different content."""


@dataclass(frozen=True)
class Entry:
    uri: str
    model: str
    recipe: str
    artifact_id: str


# --- local directories ------------------------------------------------------------------------------

def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Parse and sanity-check `path/manifest.json` (structure only, no hashing)."""
    mpath = Path(path) / MANIFEST
    if not mpath.is_file():
        raise BadInput(f"{path} is not an artifact directory: it has no {MANIFEST}")
    try:
        manifest = json.loads(mpath.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IntegrityError(f"{mpath} is not valid JSON ({e})") from None
    _check_manifest_shape(manifest, str(mpath))
    return manifest


def content_id(files: dict, lineage: dict) -> str:
    """An artifact's id: a hash of every file's sha256 and size and of its lineage. Identical runs give
    identical ids, and a manifest edited in any of those fields no longer matches its own id."""
    return hashlib.sha256(canonical_json({"files": files, "lineage": lineage})).hexdigest()[:16]


def check_identity(manifest: dict, where: str, entry: Entry | None = None) -> None:
    """The manifest names itself truthfully: its artifact_id is the content id of its files and lineage,
    its model and recipe are the lineage's, and, when it came from a registry entry, the entry it was read
    from has that id, model and recipe. This catches a manifest edited to list other files or to pass for
    another entry. (A content id is not a signature: whoever can write the registry can also write a new,
    self-consistent entry; aliases and access control guard against that.)"""
    lineage = manifest.get("lineage")
    if not isinstance(manifest.get("artifact_id"), str) or not isinstance(lineage, dict):
        raise IntegrityError(f"{where}: manifest has no artifact_id/lineage, so its content cannot be "
                             "authenticated; only artifacts written by squeezeflow's pipeline load")
    expected = content_id(manifest["files"], lineage)
    if manifest["artifact_id"] != expected:
        raise IntegrityError(f"{where}: manifest was modified: its artifact_id {manifest['artifact_id']} is "
                             f"not the content id {expected} of the files and lineage it lists")
    for field in ("model", "recipe"):
        recorded = (lineage.get(field) or {}).get("name") if isinstance(lineage.get(field), dict) else None
        if manifest.get(field) != recorded:
            raise IntegrityError(f"{where}: manifest was modified: {field} {manifest.get(field)!r} is not the "
                                 f"lineage's {recorded!r}")
    if entry is not None:
        for field, value in (("artifact_id", entry.artifact_id), ("model", entry.model), ("recipe", entry.recipe)):
            if manifest.get(field) != value:
                raise IntegrityError(f"{where}: manifest says {field} {manifest.get(field)!r} but it was read "
                                     f"from {entry.uri} ({field} {value!r}): it points elsewhere")


def verify_dir(path: str | os.PathLike, authenticate: bool = True) -> dict[str, Any]:
    """Check a local artifact directory against its manifest; return the manifest.

    Every listed file must exist with the recorded size and sha256, and no unlisted file may exist
    (besides manifest.json). With `authenticate` (the default, and what every loader uses) the manifest
    must also carry its content id (see check_identity). Raises IntegrityError naming the first
    offending file.
    """
    root = Path(path)
    manifest = read_manifest(root)
    files = manifest["files"]
    for rel, meta in sorted(files.items()):
        f = root / rel
        if not f.is_file():
            raise IntegrityError(f"{rel}: listed in the manifest but missing from {root}")
        if f.stat().st_size != meta["size"]:
            raise IntegrityError(f"{rel}: size {f.stat().st_size} != manifest {meta['size']} in {root}")
        if sha256_file(f) != meta["sha256"]:
            raise IntegrityError(f"{rel}: sha256 does not match the manifest in {root} (corrupted or modified)")
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root).as_posix()
        if f.is_file() and rel != MANIFEST and rel not in files and f.name not in IGNORED_FILES:
            raise IntegrityError(f"{rel}: present in {root} but not listed in its manifest")
    if authenticate:
        where = str(root / MANIFEST)
        for rel in sorted(files):
            refuse_pickle(root / rel, rel)
        check_identity(manifest, where)
        results = _recorded_results(root) if METRICS_FILE in files else None
        if results and (manifest.get("metrics") != results[-1] or manifest.get("baseline") != results[0]):
            raise IntegrityError(f"{where}: manifest was modified: its metrics differ from {METRICS_FILE}, "
                                 "whose hash it lists")
    return manifest


def _recorded_results(root: Path) -> list | None:
    try:
        results = json.loads((root / METRICS_FILE).read_bytes()).get("results")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise IntegrityError(f"{METRICS_FILE} in {root} is not a metrics document ({e})") from None
    return results if isinstance(results, list) and len(results) >= 1 else None


# Pickle-based weight files, refused by name and by content: unpickling runs arbitrary code. Files in
# formats whose readers never unpickle (safetensors, JSON, text, PNG) are not sniffed: a safetensors
# header length can begin with the same bytes as a pickle.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz", ".joblib")
SAFE_SUFFIXES = (".safetensors", ".json", ".md", ".txt", ".png", ".jinja", ".csv")


def refuse_pickle(path: Path, rel: str) -> None:
    suffix = path.suffix.lower()
    if suffix in SAFE_SUFFIXES:
        return
    with open(path, "rb") as f:
        head = f.read(4)
    # protocol 2+ pickles start with 0x80 <proto>; torch.save archives are zip files holding a pickle
    if suffix in PICKLE_SUFFIXES or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5) \
            or head == b"PK\x03\x04":
        raise IntegrityError(f"{rel}: a pickle or torch.save archive; squeezeflow never loads pickled data "
                             "(weights must be safetensors)")


def _check_manifest_shape(manifest: Any, where: str) -> None:
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise IntegrityError(f"{where}: manifest has no 'files' mapping")
    for rel, meta in manifest["files"].items():
        parts = Path(rel).parts
        if rel.startswith("/") or ".." in parts or rel == MANIFEST or not parts:
            raise IntegrityError(f"{where}: illegal file path in manifest: {rel!r}")
        if not (isinstance(meta, dict) and isinstance(meta.get("size"), int)
                and re.fullmatch(r"[0-9a-f]{64}", str(meta.get("sha256", "")))):
            raise IntegrityError(f"{where}: manifest entry for {rel!r} needs a sha256 (hex) and an int size")


# --- the registry -----------------------------------------------------------------------------------

class Registry:
    """An artifact registry at s3://bucket/prefix (credentials and endpoint: see squeezeflow.s3)."""

    def __init__(self, uri: str, s3_client: Any = None):
        self.loc = S3Location.parse(uri)
        self.uri = self.loc.uri().rstrip("/")
        self._c = s3_client or client()

    # --- writing --------------------------------------------------------------------------------
    def publish(self, local_dir: str | os.PathLike, model: str, recipe: str, artifact_id: str,
                alias: str | None = "latest") -> Entry:
        """Upload a verified artifact directory as a new immutable entry and point `alias` at it
        (`latest` by default; None moves nothing, e.g. for a candidate that still has to pass a gate).

        Files go first (each PUT carries its SHA256, so the server rejects a corrupted body), the
        manifest last. Re-publishing identical content uploads nothing; different content under an
        existing id is refused.
        """
        for label, name in (("model", model), ("recipe", recipe), ("artifact id", artifact_id)):
            check_name(label, name)
        if alias is not None:
            check_name("alias", alias)
        local = Path(local_dir)
        for rel, meta in read_manifest(local)["files"].items():  # before hashing gigabytes
            if meta["size"] > MAX_PUT_BYTES:
                raise BadInput(f"{rel} is {meta['size']} bytes; files over 5 GiB cannot be published "
                               "(shard the safetensors files)")
        # Storage needs only the file list to be true; identity is checked where artifacts are loaded.
        manifest = verify_dir(local, authenticate=False)
        manifest_bytes = (local / MANIFEST).read_bytes()
        entry = self._entry(model, recipe, artifact_id)

        with self._errors(f"publish {entry.uri}"):
            existing = self._read_manifest(entry)
            if existing is not None:
                if existing != manifest:
                    raise ImmutableEntryError(
                        f"{entry.uri} already exists with a different manifest; entries are immutable: "
                        "publish under a new artifact id")
            else:
                for rel, meta in sorted(manifest["files"].items()):
                    self._put_file(entry, rel, local / rel, meta)
                self._put_manifest(entry, manifest, manifest_bytes)
            # Also on a re-publish: it completes a publish that crashed between manifest and alias.
            if alias is not None:
                self._move_alias(entry, alias)
        return entry

    def promote(self, uri_or_ref: str, alias: str) -> Entry:
        """Point `alias` of the entry's model/recipe at the entry (conditional write, retried)."""
        check_name("alias", alias)
        entry = self._parse_entry(self.resolve(uri_or_ref))
        with self._errors(f"promote {entry.uri} to {alias}"):
            self._move_alias(entry, alias)
        return entry

    # --- reading --------------------------------------------------------------------------------
    def history(self, model: str, recipe: str, alias: str) -> list[dict[str, Any]]:
        """Every move of `alias` of model/recipe, oldest first: {"seq", "uri", "artifact_id", "updated",
        "previous"} (previous: where it pointed before, None for the first). [] if it never existed."""
        for label, name in (("model", model), ("recipe", recipe), ("alias", alias)):
            check_name(label, name)
        prefix = self._history_key(model, recipe, alias, None)
        with self._errors(f"read the history of {model}/{recipe}@{alias}"):
            records = {}
            for key, _ in self._keys(prefix):
                data = self._get(key)
                try:
                    record = json.loads(data)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise IntegrityError(f"alias history record s3://{self.loc.bucket}/{key} is not valid JSON") from None
                records[record["seq"]] = record
            # The current position is logged by the move that leaves it (see _move_alias): add it here.
            current = self._read_alias(model, recipe, alias)[0]
            if current is not None and _seq(current) not in records:
                records[_seq(current)] = _history_record(current)
        return [records[k] for k in sorted(records)]

    def resolve(self, ref: str) -> str:
        """The s3:// URI of the (existing, complete) entry a ref names."""
        with self._errors(f"resolve {ref}"):
            if ref.startswith("s3://"):
                entry = self._parse_entry(ref)
            elif "@" in ref or ref.count("/") == 1:
                path, _, alias = ref.partition("@")
                model, recipe = _split_ref(ref, path, 2)
                alias = alias or "latest"
                check_name("alias", alias)
                pointer = self._read_alias(model, recipe, alias)[0]
                if pointer is None:
                    known = sorted(self._aliases_of(model, recipe))
                    raise BadInput(f"no alias {alias!r} for {model}/{recipe} in {self.uri}"
                                   + (f" (aliases: {', '.join(known)})" if known else " (no aliases yet)"))
                entry = self._parse_entry(pointer["uri"])
            else:
                entry = self._entry(*_split_ref(ref, ref, 3))
            if self._head(self._key(entry, MANIFEST)) is None:
                raise BadInput(f"no registry entry {entry.uri} (missing or not completely published)")
        return entry.uri

    def list(self, model: str | None = None, recipe: str | None = None) -> list[dict[str, Any]]:
        """Complete entries (manifest present), oldest first, with their aliases and metrics."""
        for label, name in (("model", model), ("recipe", recipe)):
            if name is not None:
                check_name(label, name)
        sub = "/".join(p for p in ("models", model, recipe if model else None) if p)
        with self._errors(f"list {self.uri}"):
            manifests = [(k, lm) for k, lm in self._keys(self.loc.key(sub) + "/")
                         if k.endswith("/" + MANIFEST)]
            aliases = self._all_aliases()
            out = []
            for key, modified in manifests:
                rel = key[len(self.loc.key("models")) + 1:].split("/")
                if len(rel) != 4 or not all(_NAME.match(p) for p in rel[:3]):
                    continue  # only models/<model>/<recipe>/<id>/manifest.json is an entry
                entry = self._entry(rel[0], rel[1], rel[2])
                if recipe and entry.recipe != recipe:
                    continue
                manifest = self._read_manifest(entry) or {}
                out.append({"uri": entry.uri, "model": entry.model, "recipe": entry.recipe,
                            "artifact_id": entry.artifact_id, "aliases": sorted(aliases.get(entry.uri, [])),
                            "created": modified.isoformat(), "metrics": manifest.get("metrics", {})})
        return sorted(out, key=lambda e: (e["created"], e["uri"]))

    def show(self, ref: str) -> dict[str, Any]:
        """{"uri", "model", "recipe", "artifact_id", "created", "aliases", "manifest"} of one entry."""
        entry = self._parse_entry(self.resolve(ref))
        with self._errors(f"show {entry.uri}"):
            head = self._head(self._key(entry, MANIFEST))
            manifest = self._read_manifest(entry)
            if head is None or manifest is None:
                raise BadInput(f"no registry entry {entry.uri}")
            aliases = self._aliases_of(entry.model, entry.recipe)
        return {"uri": entry.uri, "model": entry.model, "recipe": entry.recipe,
                "artifact_id": entry.artifact_id, "created": head["LastModified"].isoformat(),
                "aliases": sorted(a for a, uri in aliases.items() if uri == entry.uri), "manifest": manifest}

    def pull(self, ref: str, dest: str | os.PathLike | None = None) -> Path:
        """Download an entry into `dest` (default: the scratch dir), verifying every byte first.

        Files land in a temporary sibling directory that is renamed into place only after every sha256
        matched, so `dest` is either absent or complete. An existing `dest` holding the same verified
        entry is returned as is.
        """
        entry = self._parse_entry(self.resolve(ref))
        if dest is None:
            from .settings import scratch_dir

            dest = scratch_dir() / "registry" / entry.model / entry.recipe / entry.artifact_id
        dest = Path(dest)
        with self._errors(f"pull {entry.uri}"):
            manifest_bytes = self._get(self._key(entry, MANIFEST))
            manifest = _parse_remote_manifest(manifest_bytes, entry)
            if "artifact_id" in manifest:  # pipeline artifacts; loaders refuse manifests without one
                check_identity(manifest, f"{entry.uri}/{MANIFEST}", entry)
            if dest.exists():
                if (dest / MANIFEST).is_file() and _same_manifest(dest, manifest):
                    verify_dir(dest, authenticate=False)
                    return dest
                if not dest.is_dir() or any(dest.iterdir()):
                    raise BadInput(f"{dest} already exists and holds something else; remove it or "
                                   "choose another destination")
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.pull-", dir=dest.parent))
            try:
                self._download_verified(entry, manifest, tmp)
                (tmp / MANIFEST).write_bytes(manifest_bytes)
                if dest.exists():
                    dest.rmdir()  # empty, checked above
                os.replace(tmp, dest)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return dest

    # --- internals: entries ---------------------------------------------------------------------
    def _entry(self, model: str, recipe: str, artifact_id: str) -> Entry:
        for label, name in (("model", model), ("recipe", recipe), ("artifact id", artifact_id)):
            check_name(label, name)
        return Entry(self.loc.uri("models", model, recipe, artifact_id), model, recipe, artifact_id)

    def _parse_entry(self, uri: str) -> Entry:
        base = self.loc.uri("models") + "/"
        rest = uri.rstrip("/")
        if not rest.startswith(base) or rest[len(base):].count("/") != 2:
            raise BadInput(f"{uri!r} is not an entry of registry {self.uri} "
                           f"(expected {base}<model>/<recipe>/<artifact_id>)")
        return self._entry(*rest[len(base):].split("/"))

    def _key(self, entry: Entry, rel: str = "") -> str:
        return self.loc.key("models", entry.model, entry.recipe, entry.artifact_id, rel)

    def _read_manifest(self, entry: Entry) -> dict[str, Any] | None:
        data = self._get(self._key(entry, MANIFEST), missing_ok=True)
        return None if data is None else _parse_remote_manifest(data, entry)

    def _put_file(self, entry: Entry, rel: str, path: Path, meta: dict[str, Any]) -> None:
        key = self._key(entry, rel)
        with open(path, "rb") as body:
            stored = self._put_new(key, body, meta["sha256"])
        if not stored:  # already there, from an earlier attempt or a concurrent identical publish
            self._check_existing(key, rel, meta)

    def _put_manifest(self, entry: Entry, manifest: dict, data: bytes) -> None:
        if not self._put_new(self._key(entry, MANIFEST), data, hashlib.sha256(data).hexdigest()):
            # A concurrent publisher finished first; fine if it published the same thing.
            if self._read_manifest(entry) != manifest:
                raise ImmutableEntryError(f"{entry.uri} was just published with a different manifest")

    def _put_new(self, key: str, body: Any, sha256_hex: str) -> bool:
        """PUT only if the key is absent. False when it already exists (HTTP 412)."""
        from botocore.exceptions import ClientError

        try:
            self._c.put_object(Bucket=self.loc.bucket, Key=key, Body=body, IfNoneMatch="*",
                               ChecksumSHA256=base64.b64encode(bytes.fromhex(sha256_hex)).decode())
            return True
        except ClientError as e:
            if _code(e) in ("PreconditionFailed", "412"):
                return False
            if _code(e) in ("BadDigest", "XAmzContentSHA256Mismatch", "InvalidDigest"):
                raise IntegrityError(f"upload of {key} was rejected: the bytes sent do not match their "
                                     "sha256 (file changed during upload?)") from None
            raise

    def _check_existing(self, key: str, rel: str, meta: dict[str, Any]) -> None:
        head = self._head(key, checksum=True) or {}
        want = base64.b64encode(bytes.fromhex(meta["sha256"])).decode()
        same = head.get("ContentLength") == meta["size"] and (
            head["ChecksumSHA256"] == want if head.get("ChecksumSHA256")
            else _sha256_stream(self._stream(key)) == meta["sha256"])
        if not same:
            raise ImmutableEntryError(
                f"{rel}: s3://{self.loc.bucket}/{key} already holds different bytes (a crashed or concurrent "
                "publish of the same artifact id with other content); publish under a new artifact id")

    def _download_verified(self, entry: Entry, manifest: dict, tmp: Path) -> None:
        files = manifest["files"]
        prefix = self._key(entry) + "/"
        present = {k[len(prefix):] for k, _ in self._keys(prefix)}
        unlisted = sorted(present - set(files) - {MANIFEST})
        if unlisted:
            raise IntegrityError(f"{unlisted[0]}: stored in {entry.uri} but not listed in its manifest")
        for rel, meta in sorted(files.items()):
            if rel not in present:
                raise IntegrityError(f"{rel}: listed in the manifest of {entry.uri} but missing from S3")
            out = tmp / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            h, size = hashlib.sha256(), 0
            with open(out, "wb") as f:
                for chunk in self._stream(self._key(entry, rel)):
                    h.update(chunk)
                    size += len(chunk)
                    f.write(chunk)
            if size != meta["size"] or h.hexdigest() != meta["sha256"]:
                raise IntegrityError(f"{rel}: downloaded bytes do not match the manifest of {entry.uri} "
                                     f"(sha256 {h.hexdigest()[:12]}, size {size}; expected "
                                     f"{meta['sha256'][:12]}, {meta['size']}): the stored object is corrupted")

    # --- internals: aliases ---------------------------------------------------------------------
    def _alias_key(self, model: str, recipe: str, alias: str) -> str:
        return self.loc.key("aliases", model, recipe, f"{alias}.json")

    def _read_alias(self, model: str, recipe: str, alias: str) -> tuple[dict | None, str | None]:
        """(pointer, ETag), or (None, None) when the alias does not exist."""
        from botocore.exceptions import ClientError

        try:
            r = self._c.get_object(Bucket=self.loc.bucket, Key=self._alias_key(model, recipe, alias))
        except ClientError as e:
            if _code(e) in ("NoSuchKey", "404", "NotFound"):
                return None, None
            raise
        try:
            return json.loads(r["Body"].read()), r["ETag"]
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise IntegrityError(f"alias {alias!r} of {model}/{recipe} in {self.uri} is not valid JSON") from None

    def _history_key(self, model: str, recipe: str, alias: str, seq: int | None) -> str:
        folder = self.loc.key("alias-history", model, recipe, alias)
        return folder + "/" if seq is None else f"{folder}/{seq:010d}.json"

    def _move_alias(self, entry: Entry, alias: str, attempts: int = 10) -> None:
        """Read-modify-write with If-Match/If-None-Match; on a lost race re-read and try again.

        Alias history: the pointer carries the move's sequence number, and the position it is about to
        leave is first logged as a create-only record (If-None-Match) under that number. Only the pointer's
        conditional write decides who moved it, so records are never written for a move that lost its race;
        a mover that crashes after its write leaves its position to be logged by the next move (history()
        shows it meanwhile). The pointer stays the last write of a publish, and no move is ever lost."""
        from botocore.exceptions import ClientError

        key = self._alias_key(entry.model, entry.recipe, alias)
        for attempt in range(attempts):
            current, etag = self._read_alias(entry.model, entry.recipe, alias)
            if current is not None and current.get("uri") == entry.uri:
                return  # already there: no write, so a no-op re-publish changes nothing
            if current is not None:
                self._log_position(entry.model, entry.recipe, alias, current)
            now = datetime.now(timezone.utc).isoformat()
            history = ([{"uri": entry.uri, "artifact_id": entry.artifact_id, "updated": now}]
                       + (current or {}).get("history", []))[:ALIAS_HISTORY]
            previous = None if current is None else {"uri": current.get("uri"), "artifact_id": current.get("artifact_id")}
            body = canonical_json({"uri": entry.uri, "artifact_id": entry.artifact_id, "updated": now,
                                   "seq": 1 if current is None else _seq(current) + 1, "previous": previous,
                                   "history": history})
            cond = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
            try:
                self._c.put_object(Bucket=self.loc.bucket, Key=key, Body=body,
                                   ContentType="application/json", **cond)
                return
            except ClientError as e:
                # 412: someone moved it since we read it. 409: a concurrent conditional write (AWS).
                if _code(e) not in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                    raise
            time.sleep(random.uniform(0.02, 0.1) * (attempt + 1))
        raise RuntimeError(f"alias {alias!r} of {entry.model}/{entry.recipe} is contended: gave up after "
                           f"{attempts} conditional writes; try again")

    def _log_position(self, model: str, recipe: str, alias: str, pointer: dict) -> None:
        """Create the history record of the pointer's current position unless it exists. Concurrent
        movers derive the same record from the same pointer, so whichever create lands is the right one."""
        from botocore.exceptions import ClientError

        data = canonical_json(_history_record(pointer))
        key = self._history_key(model, recipe, alias, _seq(pointer))
        for attempt in range(5):
            try:
                self._c.put_object(Bucket=self.loc.bucket, Key=key, Body=data, ContentType="application/json",
                                   IfNoneMatch="*")
                return
            except ClientError as e:
                if _code(e) in ("PreconditionFailed", "412"):
                    return  # already logged
                if _code(e) not in ("ConditionalRequestConflict", "409"):
                    raise
            time.sleep(random.uniform(0.02, 0.1) * (attempt + 1))
        raise RuntimeError(f"cannot log the history of alias {alias!r} of {model}/{recipe}: contended; try again")

    def _aliases_of(self, model: str, recipe: str) -> dict[str, str]:
        """{alias: entry uri} for one model/recipe."""
        out = {}
        prefix = self.loc.key("aliases", model, recipe) + "/"
        for key, _ in self._keys(prefix):
            name = key[len(prefix):]
            if name.endswith(".json") and "/" not in name:
                pointer = self._read_alias(model, recipe, name[:-len(".json")])[0]
                if pointer:
                    out[name[:-len(".json")]] = pointer["uri"]
        return out

    def _all_aliases(self) -> dict[str, list[str]]:
        """{entry uri: [alias, ...]} across the registry."""
        by_uri: dict[str, list[str]] = {}
        prefix = self.loc.key("aliases") + "/"
        for key, _ in self._keys(prefix):
            parts = key[len(prefix):].split("/")
            if len(parts) == 3 and parts[2].endswith(".json"):
                alias = parts[2][:-len(".json")]
                pointer = self._read_alias(parts[0], parts[1], alias)[0]
                if pointer:
                    by_uri.setdefault(pointer["uri"], []).append(alias)
        return by_uri

    # --- internals: S3 primitives ---------------------------------------------------------------
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
            if _code(e) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def _get(self, key: str, missing_ok: bool = False) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            return self._c.get_object(Bucket=self.loc.bucket, Key=key)["Body"].read()
        except ClientError as e:
            if missing_ok and _code(e) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise

    def _stream(self, key: str, chunk: int = 1 << 20) -> Iterator[bytes]:
        body = self._c.get_object(Bucket=self.loc.bucket, Key=key)["Body"]
        try:
            yield from body.iter_chunks(chunk)
        finally:
            body.close()

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
            code = _code(e)
            if code in ("NoSuchBucket",):
                raise BadInput(f"cannot {action}: bucket {self.loc.bucket!r} does not exist at {where}") from None
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise BadInput(f"cannot {action}: access denied by {where} ({code}); check "
                               "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY") from None
            raise


def open_registry(uri: str | None = None) -> Registry:
    """The registry to use: `uri`, else SQUEEZEFLOW_REGISTRY, else the embedded SeaweedFS server's."""
    from .settings import registry_uri

    uri = uri or registry_uri()
    if uri is None:
        from .services import embedded_registry_uri, ensure_s3

        ensure_s3()
        uri = embedded_registry_uri()
    return Registry(uri)


# --- helpers ----------------------------------------------------------------------------------------

def check_name(label: str, name: str) -> None:
    """BadInput unless `name` can be a registry model/recipe/alias name."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise BadInput(f"invalid {label} {name!r}: use letters, digits and . _ + : - (no slashes, at most 128)")


def _split_ref(ref: str, path: str, parts: int) -> list[str]:
    pieces = path.split("/")
    if len(pieces) != parts or not all(pieces):
        raise BadInput(f"bad registry ref {ref!r}: use s3://..., model/recipe/artifact_id or model/recipe@alias")
    return pieces


def _parse_remote_manifest(data: bytes, entry: Entry) -> dict[str, Any]:
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IntegrityError(f"{MANIFEST} of {entry.uri} is not valid JSON ({e})") from None
    _check_manifest_shape(manifest, f"{entry.uri}/{MANIFEST}")
    return manifest


def _same_manifest(path: Path, manifest: dict) -> bool:
    try:
        return json.loads((path / MANIFEST).read_bytes()) == manifest
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False


def _sha256_stream(chunks: Iterator[bytes]) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def _seq(pointer: dict) -> int:
    """A pointer's move number; pointers written before alias history existed count as move 1."""
    return int(pointer.get("seq") or 1)


def _history_record(pointer: dict) -> dict[str, Any]:
    return {"seq": _seq(pointer), "uri": pointer.get("uri"), "artifact_id": pointer.get("artifact_id"),
            "updated": pointer.get("updated"), "previous": pointer.get("previous")}


def _code(e: Exception) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))
