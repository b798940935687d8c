"""`squeezeflow registry list|show|pull|promote|history|keygen`: everything it prints that comes from the
registry is escaped (terminal.safe_text) or JSON."""
from __future__ import annotations

from pathlib import Path

from .cli import _print_json
from .errors import BadInput


def _registry(args):
    from .registry import open_registry
    from .s3 import check_reachable

    reg = open_registry(args.registry or None, require_signature=args.require_signature or None,
                        trusted_keys=args.trusted_key)
    if args.action in ("pull", "promote") or args.require_signature:
        reg.trust  # a bad or incomplete trust configuration is one line before any download
    check_reachable(reg.uri)
    return reg


def cmd_registry(args) -> int:
    from .terminal import safe_text as t

    if args.action == "keygen":
        return _keygen(args)
    if args.action != "list" and not args.ref:
        raise BadInput(f"registry {args.action} needs a REF (s3:// entry URI, model/recipe@alias or model/recipe)")
    if args.action == "pull" and not args.dest:
        raise BadInput("registry pull needs --dest DIR")
    if args.action == "promote" and not args.alias:
        raise BadInput("registry promote needs --alias NAME")
    reg = _registry(args)
    # Everything printed below comes from the registry: escaped (t), or JSON (which escapes by itself).
    if args.action == "list":
        entries = reg.list()
        if args.json:
            _print_json({"artifacts": entries})
        else:
            for e in entries:
                ppl = e["metrics"].get("perplexity")
                ppl = ppl if isinstance(ppl, dict) else {}
                print(t(f"{e['uri']}  {','.join(e['aliases'])}  "
                        + "  ".join(f"{k}={v:.3f}" if isinstance(v, (int, float)) else f"{k}={v}" for k, v in ppl.items())))
    elif args.action == "show":
        _print_json(reg.show(args.ref))
    elif args.action == "pull":
        from .registry import check_dest

        path = reg.pull(args.ref, check_dest(Path(args.dest)))
        _print_json({"path": str(path)}) if args.json else print(t(path))
    elif args.action == "promote":
        entry = reg.promote(args.ref, args.alias)
        # The move just made (or, for a no-op promote, the one that put the alias there already).
        moves = [h for h in reg.history(entry.model, entry.recipe, args.alias) if h["uri"] == entry.uri]
        previous = (moves[-1].get("previous") or {}) if moves else {}
        out = {"model": entry.model, "recipe": entry.recipe, "alias": args.alias, "uri": entry.uri,
               "artifact_id": entry.artifact_id, "previous": previous.get("uri")}
        if args.json:
            _print_json(out)
        else:
            print(f"{entry.model}/{entry.recipe}@{args.alias} -> {entry.artifact_id} ({entry.uri})")
            print(t(f"  was: {previous.get('artifact_id')} ({previous['uri']})") if previous.get("uri")
                  else "  was: (new alias)")
    elif args.action == "history":
        model, recipe, alias = _alias_ref(reg, args.ref, args.alias)
        records = reg.history(model, recipe, alias)
        if args.json:
            _print_json({"model": model, "recipe": recipe, "alias": alias, "history": records})
        elif not records:
            print(f"{model}/{recipe}@{alias}: never set")
        else:
            for h in records:
                was = (h.get("previous") or {}).get("artifact_id") or "-"
                print(t(f"{h['seq']:>4}  {h.get('updated')}  {h.get('artifact_id')}  (was {was})  {h.get('uri')}"))
    return 0


def _keygen(args) -> int:
    from .signing import write_keypair

    if not args.dest:
        raise BadInput("registry keygen needs --dest DIR (where signing-key.pem and signing-key.pub.pem go)")
    private, public, kid = write_keypair(Path(args.dest).expanduser())
    if args.json:
        _print_json({"key_id": kid, "private_key": str(private), "public_key": str(public)})
    else:  # paths only: the key itself is never printed
        print(f"key {kid}\n  private (keep secret, mode 0600): {private}\n  public: {public}\n"
              f"publishers: export SQUEEZEFLOW_SIGNING_KEY={private}\n"
              f"consumers:  export SQUEEZEFLOW_TRUSTED_KEYS={public} SQUEEZEFLOW_REQUIRE_SIGNATURE=1")
    return 0


def _alias_ref(reg, ref: str, alias: str | None) -> tuple[str, str, str]:
    """(model, recipe, alias) from `model/recipe[@alias]` or an entry ref, and --alias (default production)."""
    from .registry import check_name

    path, at, ref_alias = ref.partition("@")
    if at and alias and alias != ref_alias:
        raise BadInput(f"{ref!r} names alias {ref_alias!r} but --alias says {alias!r}; give one")
    alias = alias or ref_alias or "production"
    check_name("alias", alias)
    if not path.startswith("s3://") and path.count("/") == 1:
        model, recipe = path.split("/")
        check_name("model", model)
        check_name("recipe", recipe)
        return model, recipe, alias
    model, recipe = reg.resolve(path).rsplit("/", 3)[1:3]  # an entry: .../models/<model>/<recipe>/<id>
    return model, recipe, alias


def add_parser(sub) -> None:
    reg = sub.add_parser("registry", help="list, show, pull, promote artifacts; alias history; signing keys")
    reg.add_argument("action", choices=["list", "show", "pull", "promote", "history", "keygen"])
    reg.add_argument("ref", nargs="?", help="s3:// entry URI or model/recipe@alias (history: model/recipe)")
    reg.add_argument("--dest", help="pull: the directory to create; keygen: where the key files go")
    reg.add_argument("--require-signature", action="store_true",
                     help="refuse entries not signed by a trusted key (default: $SQUEEZEFLOW_REQUIRE_SIGNATURE)")
    reg.add_argument("--trusted-key", action="append", default=[], metavar="PEM_FILE",
                     help="a trusted public key, besides $SQUEEZEFLOW_TRUSTED_KEYS (repeatable)")
    reg.add_argument("--alias", help="promote: the alias to move; history: whose moves (default production)")
    reg.add_argument("--registry")
    from .aws_blocks import add_flags

    add_flags(reg, store=False)
    reg.set_defaults(fn=cmd_registry)
