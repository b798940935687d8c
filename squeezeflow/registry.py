"""The S3 artifact registry: immutable entries, movable aliases, authenticated (optionally signed) pulls.

Layout under s3://BUCKET/PREFIX:
    models/<model>/<recipe>/<artifact_id>/...            one packed artifact directory per entry
    models/<model>/<recipe>/<artifact_id>/manifest.sig   the manifest's signature, when the publisher has a key
    models/<model>/<recipe>/<artifact_id>/manifest.json  written LAST: an entry exists iff it does
    aliases/..., alias-history/...                       movable names and their log (aliases.py)

Entries never change once their manifest is written. Whatever the bucket holds is treated as untrusted
input: a pull authenticates the entry (its manifest's content id and names match the entry it was read
from, every byte matches its sha256, nothing is a pickle) and checks its signature against the keys the
consumer trusts (signing.py; required with SQUEEZEFLOW_REQUIRE_SIGNATURE=1 / --require-signature); an
alias is followed only to an entry of its own model/recipe; and every piece of registry text in an error
or a listing is escaped (terminal.py). One bad entry or alias is skipped, with a warning, by listings.

Refs accepted everywhere: an entry's s3:// URI, "model/recipe/artifact_id", "model/recipe@alias", or
"model/recipe" (meaning @latest).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from .aliases import AliasMixin, warn
from .errors import BadInput, IntegrityError, UntrustedEntry
from .manifests import (IGNORED_FILES, MANIFEST, METRICS_FILE, NAME, NOT_CONTENT, PICKLE_SUFFIXES,  # noqa: F401
                        SAFE_SUFFIXES, Entry, authenticate_dir, check_identity, check_name, content_id,
                        parse_manifest, read_manifest, refuse_pickle, verify_dir)
from .s3 import S3Objects
from .signing import SIGNATURE, Signer, TrustPolicy, signer_from_env, signer_of
from .terminal import safe_text

MAX_OBJECT_BYTES = 5 * 1024**4  # S3's object limit (multipart: 10,000 parts of up to 5 GiB)


PULL_LOCK = ".pull.lock"  # in a pull's staging directory, never in a pulled one


class ImmutableEntryError(BadInput):
    """An entry with this id already exists (or is being written) with different content."""


class Registry(S3Objects, AliasMixin):
    """An artifact registry at s3://bucket/prefix (credentials and endpoint: see squeezeflow.s3).

    `require_signature` / `trusted_keys` (PEM texts or files) add to what the environment configures
    (see signing.py); None means the environment alone."""

    def __init__(self, uri: str, s3_client: Any = None, *, require_signature: bool | None = None,
                 trusted_keys: list[str] | None = None):
        super().__init__(uri, s3_client)
        self._trust_args = (require_signature, trusted_keys)
        self._trust: TrustPolicy | None = None

    @property
    def trust(self) -> TrustPolicy:
        """The consumer's signature policy, read on first use (BadInput for a bad configuration)."""
        if self._trust is None:
            self._trust = TrustPolicy.from_env(*self._trust_args)
        return self._trust

    # --- writing --------------------------------------------------------------------------------
    def publish(self, local_dir: str | os.PathLike, model: str, recipe: str, artifact_id: str,
                alias: str | None = "latest") -> Entry:
        """Upload a verified artifact directory as a new immutable entry and point `alias` at it
        (`latest` by default; None moves nothing, e.g. for a candidate that still has to pass a gate).

        Files go first (each PUT, or each part of a large file's multipart upload, carries its SHA256, so the
        server rejects a corrupted body), then the signature when a signing key is configured, the manifest
        last (a conditional write). Re-publishing identical content uploads nothing (but signs an unsigned
        entry); different content under an existing id is refused.
        """
        for label, name in (("model", model), ("recipe", recipe), ("artifact id", artifact_id)):
            check_name(label, name)
        if alias is not None:
            check_name("alias", alias)
        local = Path(local_dir)
        for rel, meta in read_manifest(local)["files"].items():  # before hashing gigabytes
            if meta["size"] > MAX_OBJECT_BYTES:
                raise BadInput(f"{safe_text(rel)} is {meta['size']} bytes; S3 holds objects up to 5 TiB "
                               "(shard the safetensors files)")
        signer = signer_from_env()  # a bad key configuration fails here, before any upload
        entry = self._entry(model, recipe, artifact_id)
        # Storage needs only the file list to be true; identity is checked where artifacts are loaded.
        # A signature vouches for the artifact, so a signed one is first authenticated like a loader would.
        manifest = verify_dir(local, authenticate=False)
        if signer is not None:
            authenticate_dir(local, manifest)
            check_identity(manifest, safe_text(local / MANIFEST), entry)
        manifest_bytes = (local / MANIFEST).read_bytes()

        with self._errors(f"publish {entry.uri}"):
            stored = self._get(self._key(entry, MANIFEST), missing_ok=True)
            if stored is not None:
                if parse_manifest(stored, f"{entry.uri}/{MANIFEST}") != manifest:
                    raise ImmutableEntryError(
                        f"{entry.uri} already exists with a different manifest; entries are immutable: "
                        "publish under a new artifact id")
                if signer is not None:
                    self._put_signature(entry, signer, stored)  # the bytes stored, which readers verify
            else:
                for rel, meta in sorted(manifest["files"].items()):
                    self._put_file(entry, rel, local / rel, meta)
                if signer is not None:
                    self._put_signature(entry, signer, manifest_bytes)
                self._put_manifest(entry, manifest, manifest_bytes)
            # Also on a re-publish: it completes a publish that crashed between manifest and alias.
            if alias is not None:
                self._move_alias(entry, alias)
        return entry

    def promote(self, uri_or_ref: str, alias: str) -> Entry:
        """Point `alias` of the entry's model/recipe at the entry (conditional write, retried), after
        checking its signature under the trust policy (and its identity when signatures are required)."""
        check_name("alias", alias)
        entry = self._parse_entry(self.resolve(uri_or_ref))
        with self._errors(f"promote {entry.uri} to {alias}"):
            self._authentic_manifest(entry, identity=self.trust.require)
            self._move_alias(entry, alias)
        return entry

    # --- reading --------------------------------------------------------------------------------
    def resolve(self, ref: str) -> str:
        """The s3:// URI of the (existing, complete) entry a ref names."""
        with self._errors(f"resolve {safe_text(ref)}"):
            if ref.startswith("s3://"):
                entry = self._parse_entry(ref)
            elif "@" in ref or ref.count("/") == 1:
                path, _, alias = ref.partition("@")
                model, recipe = _split_ref(ref, path, 2)
                alias = alias or "latest"
                check_name("alias", alias)
                pointer = self._followable_alias(model, recipe, alias)
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
        """Complete entries (manifest present), oldest first, with their aliases and metrics. An entry
        or alias that cannot be read is skipped with a warning: one bad object hides only itself."""
        for label, name in (("model", model), ("recipe", recipe)):
            if name is not None:
                check_name(label, name)
        sub = "/".join(p for p in ("models", model, recipe if model else None) if p)
        with self._errors(f"list {self.uri}"):
            manifests = [(k, lm) for k, lm in self._keys(self.loc.key(sub) + "/") if k.endswith("/" + MANIFEST)]
            aliases = self._all_aliases()
            out = []
            for key, modified in manifests:
                rel = key[len(self.loc.key("models")) + 1:].split("/")
                if len(rel) != 4:
                    continue  # only models/<model>/<recipe>/<id>/manifest.json is an entry
                try:
                    entry = self._entry(rel[0], rel[1], rel[2])
                    manifest = parse_manifest(self._get(key), f"{entry.uri}/{MANIFEST}")
                except (BadInput, IntegrityError) as e:
                    warn(f"skipped registry entry s3://{self.loc.bucket}/{key}: {e}")
                    continue
                if recipe and entry.recipe != recipe:
                    continue
                metrics = manifest.get("metrics")
                out.append({"uri": entry.uri, "model": entry.model, "recipe": entry.recipe,
                            "artifact_id": entry.artifact_id, "aliases": sorted(aliases.get(entry.uri, [])),
                            "created": modified.isoformat(), "metrics": metrics if isinstance(metrics, dict) else {}})
        return sorted(out, key=lambda e: (e["created"], e["uri"]))

    def show(self, ref: str) -> dict[str, Any]:
        """{"uri", "model", "recipe", "artifact_id", "created", "aliases", "signature", "manifest"} of one
        entry; signature: None, or {"key_id" (as claimed), "verified" (by a trusted key)}."""
        entry = self._parse_entry(self.resolve(ref))
        with self._errors(f"show {entry.uri}"):
            head = self._head(self._key(entry, MANIFEST))
            data = self._get(self._key(entry, MANIFEST), missing_ok=True)
            if head is None or data is None:
                raise BadInput(f"no registry entry {entry.uri}")
            manifest = parse_manifest(data, f"{entry.uri}/{MANIFEST}")
            sig = self._get(self._key(entry, SIGNATURE), missing_ok=True)
            aliases = self._aliases_of(entry.model, entry.recipe)
        signature = None
        if sig is not None:
            try:
                verified = TrustPolicy(False, self.trust.trusted).check(data, sig, entry.uri) is not None
            except UntrustedEntry:
                verified = False
            signature = {"key_id": signer_of(sig), "verified": verified}
        return {"uri": entry.uri, "model": entry.model, "recipe": entry.recipe,
                "artifact_id": entry.artifact_id, "created": head["LastModified"].isoformat(),
                "aliases": sorted(a for a, uri in aliases.items() if uri == entry.uri),
                "signature": signature, "manifest": manifest}

    def pull(self, ref: str, dest: str | os.PathLike | None = None) -> Path:
        """Download an entry into `dest` (default: the scratch dir), authenticating it first.

        The manifest must carry the entry's own id, model and recipe and the content id of its files and
        lineage, and pass the signature policy. Files land in a temporary sibling directory that is renamed
        into place only after every sha256 matched, so `dest` is either absent or complete. An existing
        `dest` holding the same verified entry is returned as is. `dest` must be a plain path: not under
        a file, not through a symlink (BadInput).
        """
        dest = None if dest is None else check_dest(Path(dest))  # before any network traffic
        entry = self._parse_entry(self.resolve(ref))
        if dest is None:
            from .settings import scratch_dir

            dest = check_dest(scratch_dir().resolve() / "registry" / entry.model / entry.recipe / entry.artifact_id)
        with self._errors(f"pull {entry.uri}"):
            manifest_bytes, manifest, signature = self._authentic_manifest(entry, identity=True)
            if dest.exists():
                if (dest / MANIFEST).is_file() and _same_manifest(dest, manifest):
                    verify_dir(dest)
                    if signature is not None and not (dest / SIGNATURE).exists():
                        (dest / SIGNATURE).write_bytes(signature)
                    return dest
                if not dest.is_dir() or any(dest.iterdir()):
                    raise BadInput(f"{safe_text(dest)} already exists and holds something else; remove it or "
                                   "choose another destination")
            # A pull that is cut off (network, Ctrl-C, kill) leaves its staging directory, named by the
            # manifest's hash: pulling the same entry again resumes each file where it stopped (ranged GETs)
            # instead of starting an 8 GB download over. Bytes that fail their sha256 are dropped.
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = dest.parent / f".{dest.name}.pull-{hashlib.sha256(manifest_bytes).hexdigest()[:16]}"
                tmp.mkdir(exist_ok=True)
                lock = open(tmp / PULL_LOCK, "w")
            except (PermissionError, FileExistsError, NotADirectoryError) as e:
                raise BadInput(f"cannot pull into {safe_text(dest)}: {e.strerror}") from None
            with lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # one puller per staging directory; the next one waits
                if (dest / MANIFEST).is_file() and _same_manifest(dest, manifest):
                    verify_dir(dest)  # a concurrent pull of the same entry finished while we waited
                    return dest
                try:
                    self._download_verified(entry, manifest, tmp)
                    authenticate_dir(tmp, manifest, f"{entry.uri}/{MANIFEST}")
                    (tmp / MANIFEST).write_bytes(manifest_bytes)
                    if signature is not None:
                        (tmp / SIGNATURE).write_bytes(signature)
                    (tmp / PULL_LOCK).unlink()
                    if dest.exists():
                        dest.rmdir()  # empty, checked above
                    os.replace(tmp, dest)
                except (IntegrityError, UntrustedEntry, BadInput):
                    shutil.rmtree(tmp, ignore_errors=True)  # what is there is wrong, not merely unfinished
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
            raise BadInput(f"{safe_text(repr(uri))} is not an entry of registry {self.uri} "
                           f"(expected {base}<model>/<recipe>/<artifact_id>)")
        return self._entry(*rest[len(base):].split("/"))

    def _key(self, entry: Entry, rel: str = "") -> str:
        return self.loc.key("models", entry.model, entry.recipe, entry.artifact_id, rel)

    def _authentic_manifest(self, entry: Entry, identity: bool) -> tuple[bytes, dict, bytes | None]:
        """(manifest bytes, manifest, signature) of an entry that passes the trust policy and, with
        `identity`, names itself truthfully (UntrustedEntry otherwise)."""
        where = f"{entry.uri}/{MANIFEST}"
        data = self._get(self._key(entry, MANIFEST))
        manifest = parse_manifest(data, where)
        signature = self._get(self._key(entry, SIGNATURE), missing_ok=True)
        self.trust.check(data, signature, entry.uri)
        if identity:
            check_identity(manifest, where, entry)
        return data, manifest, signature

    def _put_file(self, entry: Entry, rel: str, path: Path, meta: dict[str, Any]) -> None:
        key = self._key(entry, rel)
        stored = self._put_new_file(key, path, meta["sha256"], meta["size"])  # multipart when large
        if not stored:  # already there, from an earlier attempt or a concurrent identical publish
            self._check_existing(key, rel, meta)

    def _put_signature(self, entry: Entry, signer: Signer, manifest_bytes: bytes) -> None:
        """Create-only: the first signature stays. ed25519 is deterministic, so one that claims our key
        but differs from ours is not ours (a leftover or a plant) and is replaced."""
        data, key = signer.sign(manifest_bytes), self._key(entry, SIGNATURE)
        if not self._put_new(key, data, hashlib.sha256(data).hexdigest()):
            existing = self._get(key, missing_ok=True)
            if existing != data and signer_of(existing) == signer.key_id:
                self._c.put_object(Bucket=self.loc.bucket, Key=key, Body=data)

    def _put_manifest(self, entry: Entry, manifest: dict, data: bytes) -> None:
        if not self._put_new(self._key(entry, MANIFEST), data, hashlib.sha256(data).hexdigest()):
            # A concurrent publisher finished first; fine if it published the same thing.
            stored = self._get(self._key(entry, MANIFEST))
            if parse_manifest(stored, f"{entry.uri}/{MANIFEST}") != manifest:
                raise ImmutableEntryError(f"{entry.uri} was just published with a different manifest")

    def _check_existing(self, key: str, rel: str, meta: dict[str, Any]) -> None:
        import base64

        head = self._head(key, checksum=True) or {}
        want = base64.b64encode(bytes.fromhex(meta["sha256"])).decode()
        same = head.get("ContentLength") == meta["size"] and (
            head["ChecksumSHA256"] == want if head.get("ChecksumSHA256")
            else _sha256_stream(self._stream(key)) == meta["sha256"])
        if not same:
            raise ImmutableEntryError(
                f"{safe_text(rel)}: s3://{self.loc.bucket}/{key} already holds different bytes (a crashed or "
                "concurrent publish of the same artifact id with other content); publish under a new artifact id")

    def _download_verified(self, entry: Entry, manifest: dict, tmp: Path) -> None:
        files = manifest["files"]
        prefix = self._key(entry) + "/"
        present = {k[len(prefix):] for k, _ in self._keys(prefix)}
        unlisted = sorted(present - set(files) - NOT_CONTENT)
        if unlisted:
            raise IntegrityError(f"{safe_text(unlisted[0])}: stored in {entry.uri} but not listed in its manifest")
        for rel, meta in sorted(files.items()):
            if rel not in present:
                raise IntegrityError(f"{safe_text(rel)}: listed in the manifest of {entry.uri} but missing from S3")
            out = tmp / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            h, size = hashlib.sha256(), 0
            have = out.stat().st_size if out.is_file() else 0
            if have > meta["size"]:
                have = 0
            with open(out, "r+b" if have else "wb") as f:
                while size < have:  # the bytes an interrupted pull left: hashed, then continued after
                    chunk = f.read(min(1 << 24, have - size))
                    h.update(chunk)
                    size += len(chunk)
                f.truncate(have)
                if have < meta["size"] or meta["size"] == 0:
                    for chunk in self._stream_from(self._key(entry, rel), have):
                        h.update(chunk)
                        size += len(chunk)
                        f.write(chunk)
            if size != meta["size"] or h.hexdigest() != meta["sha256"]:
                out.unlink(missing_ok=True)
                raise IntegrityError(f"{safe_text(rel)}: downloaded bytes do not match the manifest of {entry.uri} "
                                     f"(sha256 {h.hexdigest()[:12]}, size {size}; expected "
                                     f"{meta['sha256'][:12]}, {meta['size']}): the stored object is corrupted")


    def _stream_from(self, key: str, start: int, chunk: int = 1 << 20) -> Iterator[bytes]:
        """The object's bytes from offset `start` on (a ranged GET when resuming)."""
        if start == 0:
            yield from self._stream(key, chunk)
            return
        body = self._c.get_object(Bucket=self.loc.bucket, Key=key, Range=f"bytes={start}-")["Body"]
        try:
            yield from body.iter_chunks(chunk)
        finally:
            body.close()


def open_registry(uri: str | None = None, **trust: Any) -> Registry:
    """The registry to use: `uri`, else SQUEEZEFLOW_REGISTRY, else the embedded SeaweedFS server's.
    `trust`: require_signature / trusted_keys, as for Registry."""
    from .settings import registry_uri

    uri = uri or registry_uri()
    if uri is None:
        from .services import embedded_registry_uri, ensure_s3

        ensure_s3()
        uri = embedded_registry_uri()
    return Registry(uri, **trust)


def check_dest(dest: Path) -> Path:
    """`dest` made absolute (symlinks not followed), or BadInput when a pull could not put a plain
    directory there: a component is a symlink (the files would land wherever it points) or a file."""
    dest = dest.expanduser().absolute()
    for i in range(2, len(dest.parts) + 1):
        p = Path(*dest.parts[:i])
        if p.is_symlink():
            raise BadInput(f"cannot pull into {safe_text(dest)}: {safe_text(p)} is a symlink; give the real "
                           "directory path")
        if p != dest and p.exists() and not p.is_dir():
            raise BadInput(f"cannot pull into {safe_text(dest)}: {safe_text(p)} is a file, not a directory")
    return dest


# --- helpers ----------------------------------------------------------------------------------------

def _split_ref(ref: str, path: str, parts: int) -> list[str]:
    pieces = path.split("/")
    if len(pieces) != parts or not all(pieces):
        raise BadInput(f"bad registry ref {safe_text(repr(ref))}: use s3://..., model/recipe/artifact_id or "
                       "model/recipe@alias")
    return pieces


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
