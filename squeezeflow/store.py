"""The content-addressed artifact store every stage reads from and writes to.

Objects are immutable blobs named by their sha256: `<root>/objects/<aa>/<sha256>`. A stage returns a
small `Ref` (uri, sha256, size, kind); Prefect hashes refs, never tensors. A directory (a packed model)
is stored as a *tree*: a canonical JSON object {relative path: Ref}, itself an object.

Two backends behind one interface: a local directory (default) and an S3 prefix (boto3). Writes are
atomic (temp file + fsync + rename locally; a single PUT with a SHA256 checksum on S3), so a crash or a
full disk never leaves a half-written object under its final name, and every read verifies the hash.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel

from .errors import BadInput, IntegrityError, StoreNotWritable
from .trees import writing

STORE_SETTING = "--store (SQUEEZEFLOW_STORE)"
# S3 error codes that mean "this store will not take writes now", not "try again".
S3_UNWRITABLE = {"AccessDenied": "refuses writes (AccessDenied)", "AllAccessDisabled": "refuses writes",
                 "QuotaExceeded": "is over its quota", "XMinioStorageFull": "is full",
                 "InsufficientStorage": "is full"}


class Ref(BaseModel):
    """A pointer into the store. `uri` is `sfs://<sha256>`: location-independent by design."""

    uri: str
    sha256: str
    size: int
    kind: str

    model_config = {"frozen": True}


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with a canonical header (sorted keys, compact JSON).

    safetensors keeps `__metadata__` in a hash map, so two saves of identical tensors can order it
    differently; rewriting the header makes equal content give equal bytes (and equal hashes)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8-byte alignment
    return len(raw).to_bytes(8, "little") + raw + data[8 + n:]


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes: sorted keys, no whitespace variance, trailing newline."""
    return (json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode()


class ArtifactStore:
    """Content-addressed blobs. Use `open_store(uri)` to get the right backend."""

    uri: str

    # --- backend primitives -------------------------------------------------------------------
    def _has(self, sha: str) -> bool: ...
    def _write(self, sha: str, data: bytes) -> None: ...
    def _read(self, sha: str) -> bytes: ...
    def _delete(self, sha: str) -> None: ...

    # --- public API ---------------------------------------------------------------------------
    def put_bytes(self, data: bytes, kind: str) -> Ref:
        sha = sha256_bytes(data)
        if not self._has(sha):
            self._write(sha, data)
        return Ref(uri=f"sfs://{sha}", sha256=sha, size=len(data), kind=kind)

    def put_json(self, obj: Any, kind: str) -> Ref:
        return self.put_bytes(canonical_json(obj), kind)

    def put_tensors(self, tensors: dict, kind: str, metadata: dict[str, str] | None = None) -> Ref:
        from safetensors.torch import save

        # safetensors orders tensors by dtype then name; contiguous copies make the bytes deterministic.
        data = save({k: v.detach().contiguous().cpu() for k, v in sorted(tensors.items())}, metadata=metadata)
        return self.put_bytes(canonical_safetensors(data), kind)

    def put_file(self, path: str | os.PathLike, kind: str) -> Ref:
        """Streamed: hashed and copied in chunks, never read whole (a packed model can be GBs)."""
        sha = sha256_file(path)
        if not self._has(sha):
            self._write_file(sha, Path(path))
        return Ref(uri=f"sfs://{sha}", sha256=sha, size=Path(path).stat().st_size, kind=kind)

    def _write_file(self, sha: str, path: Path) -> None:
        self._write(sha, path.read_bytes())   # backends that can stream override this

    def _copy_out(self, ref: Ref, dest: Path) -> None:
        """Write one object to `dest`, verified against its hash (backends that can stream override this)."""
        dest.write_bytes(self.get_bytes(ref))

    def exists(self, ref: Ref) -> bool:
        return self._has(ref.sha256)

    def delete(self, ref: Ref) -> None:
        """Remove a scratch object (e.g. a superseded checkpoint). Only for objects no ref points to."""
        if self._has(ref.sha256):
            self._delete(ref.sha256)

    def get_bytes(self, ref: Ref) -> bytes:
        if not self._has(ref.sha256):
            raise IntegrityError(f"object {ref.sha256[:12]} ({ref.kind}) is missing from store {self.uri}")
        data = self._read(ref.sha256)
        if sha256_bytes(data) != ref.sha256:
            raise IntegrityError(f"object {ref.sha256[:12]} ({ref.kind}) in store {self.uri} is corrupted")
        return data

    def get_json(self, ref: Ref) -> Any:
        return json.loads(self.get_bytes(ref))

    def get_tensors(self, ref: Ref) -> dict:
        from safetensors.torch import load

        return load(self.get_bytes(ref))

    def get_tensors_metadata(self, ref: Ref) -> dict[str, str]:
        from safetensors import safe_open

        with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
            f.write(self.get_bytes(ref))
            f.flush()
            with safe_open(f.name, "pt") as st:
                return dict(st.metadata() or {})

    # --- named entries: a memo from a computation's key to the object it produced -------------------
    def put_index(self, key: str, ref: Ref) -> None:
        """Remember that the computation `key` produced `ref` (e.g. statistics for a model+calibration)."""
        self._write_index(key, canonical_json(ref.model_dump()))

    def get_index(self, key: str) -> Ref | None:
        data = self._read_index(key)
        if data is None:
            return None
        ref = Ref(**json.loads(data))
        return ref if self._has(ref.sha256) else None

    def _write_index(self, key: str, data: bytes) -> None: ...
    def _read_index(self, key: str) -> bytes | None: ...

    # --- trees (directories) ------------------------------------------------------------------
    def put_tree(self, files: dict[str, Ref], kind: str = "tree") -> Ref:
        for rel in files:
            if rel.startswith("/") or ".." in Path(rel).parts:
                raise ValueError(f"tree path escapes its root: {rel!r}")
        return self.put_json({rel: r.model_dump() for rel, r in sorted(files.items())}, kind)

    def put_dir(self, directory: str | os.PathLike, kind: str = "tree") -> Ref:
        root = Path(directory)
        files = {p.relative_to(root).as_posix(): self.put_file(p, "file")
                 for p in sorted(root.rglob("*")) if p.is_file()}
        return self.put_tree(files, kind)

    def get_tree(self, ref: Ref) -> dict[str, Ref]:
        return {rel: Ref(**r) for rel, r in self.get_json(ref).items()}

    def materialize(self, ref: Ref, dest: str | os.PathLike | None = None) -> Path:
        """The tree as a read-only directory (default location keyed by the tree's hash), verified on
        every call and rebuilt from the store's blobs when anything in it changed (see trees.py)."""
        from .settings import scratch_dir
        from .trees import materialize

        return materialize(self, ref, Path(dest) if dest else scratch_dir() / "trees" / ref.sha256)


class LocalStore(ArtifactStore):
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()
        self.uri = str(self.root)

    def _path(self, sha: str) -> Path:
        return self.root / "objects" / sha[:2] / sha

    def _has(self, sha: str) -> bool:
        return self._path(sha).is_file()

    def _write(self, sha: str, data: bytes) -> None:
        self._write_atomic(sha, lambda f: f.write(data))

    def _write_file(self, sha: str, path: Path) -> None:
        def copy(f):
            with open(path, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 22)
        self._write_atomic(sha, copy)

    def _write_atomic(self, sha: str, fill) -> None:
        path = self._path(sha)
        with writing(f"artifact store {self.uri}", STORE_SETTING):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    fill(f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)  # atomic: readers see the whole object or none
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise

    def _copy_out(self, ref: Ref, dest: Path) -> None:
        if not self._has(ref.sha256):
            raise IntegrityError(f"object {ref.sha256[:12]} ({ref.kind}) is missing from store {self.uri}")
        h = hashlib.sha256()
        with open(self._path(ref.sha256), "rb") as src, open(dest, "wb") as out:
            while block := src.read(1 << 22):
                h.update(block)
                out.write(block)
        if h.hexdigest() != ref.sha256:
            raise IntegrityError(f"object {ref.sha256[:12]} ({ref.kind}) in store {self.uri} is corrupted")

    def _read(self, sha: str) -> bytes:
        return self._path(sha).read_bytes()

    def _delete(self, sha: str) -> None:
        self._path(sha).unlink(missing_ok=True)

    def _write_index(self, key: str, data: bytes) -> None:
        path = self.root / "index" / key
        with writing(f"artifact store {self.uri}", STORE_SETTING):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
            tmp.write_bytes(data)
            os.replace(tmp, path)

    def _read_index(self, key: str) -> bytes | None:
        path = self.root / "index" / key
        return path.read_bytes() if path.is_file() else None


class S3Store(ArtifactStore):
    def __init__(self, uri: str):
        from .s3 import S3Location, client

        self.loc = S3Location.parse(uri)
        self.uri = uri
        self._client = client()

    def _key(self, sha: str) -> str:
        return self.loc.key("objects", sha[:2], sha)

    def _has(self, sha: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._client.head_object(Bucket=self.loc.bucket, Key=self._key(sha))
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def _put(self, key: str, body, **extra) -> None:
        from botocore.exceptions import ClientError

        try:
            self._client.put_object(Bucket=self.loc.bucket, Key=key, Body=body, **extra)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in S3_UNWRITABLE:
                raise StoreNotWritable(f"artifact store {self.uri} {S3_UNWRITABLE[code]}; check its credentials "
                                       f"and quota or choose another {STORE_SETTING}") from None
            raise

    def _write(self, sha: str, data: bytes) -> None:
        import base64

        # The server rejects a body whose checksum differs: no corrupted object under its name.
        self._put(self._key(sha), data, ChecksumSHA256=base64.b64encode(bytes.fromhex(sha)).decode())

    def _write_file(self, sha: str, path: Path) -> None:
        import base64

        with open(path, "rb") as body:  # botocore streams a file body instead of reading it whole
            self._put(self._key(sha), body, ChecksumSHA256=base64.b64encode(bytes.fromhex(sha)).decode())

    def _read(self, sha: str) -> bytes:
        return self._client.get_object(Bucket=self.loc.bucket, Key=self._key(sha))["Body"].read()

    def _delete(self, sha: str) -> None:
        self._client.delete_object(Bucket=self.loc.bucket, Key=self._key(sha))

    def _write_index(self, key: str, data: bytes) -> None:
        self._put(self.loc.key("index", key), data)

    def _read_index(self, key: str) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            return self._client.get_object(Bucket=self.loc.bucket, Key=self.loc.key("index", key))["Body"].read()
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise


def open_store(uri: str | None = None) -> ArtifactStore:
    from .settings import store_uri

    uri = uri or store_uri()
    if uri.startswith("s3://"):
        return S3Store(uri)
    if "://" in uri:
        raise BadInput(f"unsupported store location {uri!r}: use a local directory or s3://bucket/prefix")
    return LocalStore(uri)


def check_store(uri: str | None = None) -> None:
    """Preflight: a local store must be a directory we can create and write (S3 stores are checked by
    their first request). A BadInput now instead of a traceback after calibration."""
    from .settings import store_uri

    uri = uri or store_uri()
    if "://" in uri:
        open_store(uri)  # validates the scheme
        return
    root = Path(uri).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-check-"):
            pass
    except OSError as e:
        raise BadInput(f"artifact store {uri!r} is not a writable directory ({e.strerror or e}); "
                       "choose another --store or SQUEEZEFLOW_STORE") from None


def iter_tree_files(store: ArtifactStore, ref: Ref) -> Iterator[tuple[str, bytes]]:
    for rel, fref in store.get_tree(ref).items():
        yield rel, store.get_bytes(fref)

