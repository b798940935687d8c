"""Error types that the CLI maps to exit codes.

BadInput: the user asked for something impossible or gave us something unusable. Raised in preflight,
before any heavy work, with one line that names the problem and, where possible, the fix (exit 2).
Everything else is an ordinary failure (exit 1).
"""


class BadInput(ValueError):
    """Invalid user input: model, recipe, calibration source, store/registry location, parameters."""


class IntegrityError(RuntimeError):
    """Stored bytes do not match the sha256 recorded for them (tampering or corruption)."""


class UntrustedEntry(IntegrityError, BadInput):
    """Registry content that must not be used: unsigned or wrongly signed where a signature is required, a
    manifest that does not name itself truthfully, an alias that points outside its model/recipe or is
    malformed. An IntegrityError to callers; the CLI reports it as one line with exit status 2."""


class StoreNotWritable(BadInput):
    """The artifact store or scratch space refuses a write: read-only file system (EROFS), no permission
    (EACCES/EPERM, S3 AccessDenied) or full (ENOSPC/EDQUOT). A BadInput, so the CLI prints one line and
    exits 2 and Prefect never retries it as transient: waiting does not make a disk writable. `errno`
    is the OS error number (None for S3)."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno
