"""Aliases: named, movable pointers to registry entries, and the append-only log of their moves.

    aliases/<model>/<recipe>/<alias>.json             {"uri", "artifact_id", "updated", "seq", "previous",
                                                       "history" (the last 20 moves)}
    alias-history/<model>/<recipe>/<alias>/<seq>.json one record per alias move, never rewritten

Moves are conditional writes (If-Match on the ETag read, If-None-Match when absent), so two concurrent
promotions both land, one after the other (see `_move_alias` for why no move can go missing).

A pointer is only as trustworthy as the bucket: it may be malformed JSON, carry a corrupt `seq`, or point
at an entry of another model/recipe. Readers never follow such a pointer (resolve refuses it in one line;
listings skip it with an escaped warning), and the next move repairs it: the move replaces it, still
conditionally on its ETag, numbered one past the highest logged move, so no bad pointer freezes an alias.
"""
from __future__ import annotations

import json
import logging
import random
import re
import time
from datetime import datetime, timezone
from typing import Any

from .errors import BadInput, IntegrityError
from .manifests import Entry, check_name
from .s3 import error_code
from .store import canonical_json
from .terminal import safe_text

log = logging.getLogger("squeezeflow.registry")
ALIAS_HISTORY = 20
SEQ_LIMIT = 10**10  # keys hold the seq as 10 digits
_RECORD_NAME = re.compile(r"^(\d{10})\.json$")


def warn(message: str) -> None:
    """One escaped warning line (registry content may hold terminal escapes)."""
    log.warning("squeezeflow: warning: %s", safe_text(message))


class AliasMixin:
    """Alias operations of `Registry` (which provides the S3 primitives and `_parse_entry`)."""

    def history(self, model: str, recipe: str, alias: str) -> list[dict[str, Any]]:
        """Every move of `alias` of model/recipe, oldest first: {"seq", "uri", "artifact_id", "updated",
        "previous"} (previous: where it pointed before, None for the first). [] if it never existed.
        Malformed records are skipped with a warning."""
        for label, name in (("model", model), ("recipe", recipe), ("alias", alias)):
            check_name(label, name)
        prefix = self._history_key(model, recipe, alias, None)
        with self._errors(f"read the history of {model}/{recipe}@{alias}"):
            records = {}
            for key, _ in self._keys(prefix):
                try:
                    record = json.loads(self._get(key))
                except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                    record = None
                if not isinstance(record, dict) or _valid_seq(record.get("seq")) is None:
                    warn(f"skipped alias history record s3://{self.loc.bucket}/{key}: not a valid record")
                    continue
                previous = record.get("previous")
                records[record["seq"]] = {**_history_record(record),
                                          "previous": previous if isinstance(previous, dict) else None}
            # The current position is logged by the move that leaves it (see _move_alias): add it here.
            current, _, problem = self._read_alias(model, recipe, alias)
            if problem:
                warn(f"alias {alias} of {model}/{recipe}: {problem}; promote an entry to repair it")
            if current is not None and _seq(current) not in records:
                records[_seq(current)] = _history_record(current)
        return [records[k] for k in sorted(records)]

    # --- pointers -------------------------------------------------------------------------------
    def _alias_key(self, model: str, recipe: str, alias: str) -> str:
        return self.loc.key("aliases", model, recipe, f"{alias}.json")

    def _read_alias(self, model: str, recipe: str, alias: str) -> tuple[dict | None, str | None, str | None]:
        """(pointer, ETag, problem). (None, None, None) when the alias does not exist; (None, ETag,
        problem) when it exists but must not be followed (problem: why, unescaped)."""
        from botocore.exceptions import ClientError

        try:
            r = self._c.get_object(Bucket=self.loc.bucket, Key=self._alias_key(model, recipe, alias))
        except ClientError as e:
            if error_code(e) in ("NoSuchKey", "404", "NotFound"):
                return None, None, None
            raise
        data, etag = r["Body"].read(), r["ETag"]
        try:
            pointer = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            return None, etag, "the pointer is not valid JSON"
        problem = self._pointer_problem(pointer, model, recipe)
        return (None, etag, problem) if problem else (pointer, etag, None)

    def _pointer_problem(self, pointer: Any, model: str, recipe: str) -> str | None:
        if not isinstance(pointer, dict) or not isinstance(pointer.get("uri"), str):
            return "the pointer has no entry uri"
        try:
            entry = self._parse_entry(pointer["uri"])
        except BadInput:
            return f"it points to {pointer['uri']!r}, which is not an entry of this registry"
        if (entry.model, entry.recipe) != (model, recipe):
            return f"it points to {entry.uri}, an entry of another model/recipe"
        if pointer.get("artifact_id") != entry.artifact_id:
            return f"its artifact_id {pointer.get('artifact_id')!r} is not that of {entry.uri}"
        if pointer.get("seq") is not None and _valid_seq(pointer["seq"]) is None:
            return f"its move number (seq) {pointer['seq']!r} is not a positive integer"
        if not isinstance(pointer.get("history", []), list) or not isinstance(pointer.get("previous"), (dict, type(None))):
            return "its history/previous fields are malformed"
        return None

    def _followable_alias(self, model: str, recipe: str, alias: str) -> dict | None:
        """The pointer to follow, None when the alias does not exist; IntegrityError when it is bad."""
        pointer, _, problem = self._read_alias(model, recipe, alias)
        if problem:
            from .errors import UntrustedEntry

            raise UntrustedEntry(f"alias {alias!r} of {model}/{recipe} in {self.uri} cannot be followed: "
                                 f"{safe_text(problem)}; promote an entry of {model}/{recipe} to repair it")
        return pointer

    # --- moves ----------------------------------------------------------------------------------
    def _history_key(self, model: str, recipe: str, alias: str, seq: int | None) -> str:
        folder = self.loc.key("alias-history", model, recipe, alias)
        return folder + "/" if seq is None else f"{folder}/{seq:010d}.json"

    def _move_alias(self, entry: Entry, alias: str, attempts: int = 10) -> None:
        """Read-modify-write with If-Match/If-None-Match; on a lost race re-read and try again.

        Alias history: the pointer carries the move's sequence number, and the position it is about to
        leave is first logged as a create-only record (If-None-Match) under that number. Only the pointer's
        conditional write decides who moved it, so records are never written for a move that lost its race;
        a mover that crashes after its write leaves its position to be logged by the next move (history()
        shows it meanwhile). The pointer stays the last write of a publish, and no move is ever lost.
        A missing or malformed pointer continues after the highest logged move (see the module doc)."""
        from botocore.exceptions import ClientError

        key = self._alias_key(entry.model, entry.recipe, alias)
        for attempt in range(attempts):
            current, etag, problem = self._read_alias(entry.model, entry.recipe, alias)
            if current is not None and current.get("uri") == entry.uri:
                return  # already there: no write, so a no-op re-publish changes nothing
            if current is not None:
                self._log_position(entry.model, entry.recipe, alias, current)
                seq = _seq(current) + 1
            else:
                seq = self._last_logged_seq(entry.model, entry.recipe, alias) + 1
                if problem:
                    warn(f"alias {alias} of {entry.model}/{entry.recipe} was unusable ({problem}); "
                         f"replacing it with move {seq}")
            now = datetime.now(timezone.utc).isoformat()
            history = ([{"uri": entry.uri, "artifact_id": entry.artifact_id, "updated": now}]
                       + (current or {}).get("history", []))[:ALIAS_HISTORY]
            previous = None if current is None else {"uri": current.get("uri"), "artifact_id": current.get("artifact_id")}
            body = canonical_json({"uri": entry.uri, "artifact_id": entry.artifact_id, "updated": now,
                                   "seq": seq, "previous": previous, "history": history})
            cond = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
            try:
                self._c.put_object(Bucket=self.loc.bucket, Key=key, Body=body,
                                   ContentType="application/json", **cond)
                return
            except ClientError as e:
                # 412: someone moved it since we read it. 409: a concurrent conditional write (AWS).
                if error_code(e) not in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                    raise
            time.sleep(random.uniform(0.02, 0.1) * (attempt + 1))
        raise RuntimeError(f"alias {alias!r} of {entry.model}/{entry.recipe} is contended: gave up after "
                           f"{attempts} conditional writes; try again")

    def _last_logged_seq(self, model: str, recipe: str, alias: str) -> int:
        prefix = self._history_key(model, recipe, alias, None)
        seqs = [int(m.group(1)) for key, _ in self._keys(prefix) if (m := _RECORD_NAME.match(key[len(prefix):]))]
        return max(seqs, default=0)

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
                if error_code(e) in ("PreconditionFailed", "412"):
                    return  # already logged
                if error_code(e) not in ("ConditionalRequestConflict", "409"):
                    raise
            time.sleep(random.uniform(0.02, 0.1) * (attempt + 1))
        raise RuntimeError(f"cannot log the history of alias {alias!r} of {model}/{recipe}: contended; try again")

    # --- listings -------------------------------------------------------------------------------
    def _aliases_of(self, model: str, recipe: str) -> dict[str, str]:
        """{alias: entry uri} for one model/recipe; unusable pointers are skipped with a warning."""
        out = {}
        prefix = self.loc.key("aliases", model, recipe) + "/"
        for key, _ in self._keys(prefix):
            name = key[len(prefix):]
            if name.endswith(".json") and "/" not in name:
                pointer = self._listed_pointer(model, recipe, name[:-len(".json")])
                if pointer:
                    out[name[:-len(".json")]] = pointer["uri"]
        return out

    def _all_aliases(self) -> dict[str, list[str]]:
        """{entry uri: [alias, ...]} across the registry; unusable pointers are skipped with a warning."""
        by_uri: dict[str, list[str]] = {}
        prefix = self.loc.key("aliases") + "/"
        for key, _ in self._keys(prefix):
            parts = key[len(prefix):].split("/")
            if len(parts) == 3 and parts[2].endswith(".json"):
                pointer = self._listed_pointer(parts[0], parts[1], parts[2][:-len(".json")])
                if pointer:
                    by_uri.setdefault(pointer["uri"], []).append(parts[2][:-len(".json")])
        return by_uri

    def _listed_pointer(self, model: str, recipe: str, alias: str) -> dict | None:
        try:
            for label, name in (("model", model), ("recipe", recipe), ("alias", alias)):
                check_name(label, name)
            pointer, _, problem = self._read_alias(model, recipe, alias)
        except (BadInput, IntegrityError) as e:
            pointer, problem = None, str(e)
        if problem:
            warn(f"skipped alias {model}/{recipe}@{alias}: {problem}")
        return pointer


def _valid_seq(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 1 <= value < SEQ_LIMIT else None


def _seq(pointer: dict) -> int:
    """A pointer's move number; pointers written before alias history existed count as move 1."""
    return pointer.get("seq") or 1


def _history_record(pointer: dict) -> dict[str, Any]:
    return {"seq": _seq(pointer), "uri": pointer.get("uri"), "artifact_id": pointer.get("artifact_id"),
            "updated": pointer.get("updated"), "previous": pointer.get("previous")}
