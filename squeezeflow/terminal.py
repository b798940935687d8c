"""Text from outside (registry objects, manifests, file names) made safe to show on a terminal.

A manifest field or an S3 key can hold ANSI escape sequences (clear the screen, move the cursor, print a
fake "OK"), carriage returns and backspaces that overwrite what was printed before them, or bidi overrides
that display text in another order than it has. `safe_text` turns every character that is not printable
into a visible escape (``\\x1b``, ``\\u202e``), so what a user reads is what is there. It is idempotent:
its output has nothing left to escape, so escaping twice (at the source and again at the CLI) is harmless.
"""
from __future__ import annotations


def _escape(c: str) -> str:
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def safe_text(value: object) -> str:
    """`value` as a string with every control, format (bidi, zero-width), separator and unassigned
    character escaped; plain spaces and printable characters of any script stay as they are."""
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)
