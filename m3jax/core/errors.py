"""User errors: bad input the user can fix, reported as one line instead of a traceback.

Library code raises `UserError` (or a subclass; the project's domain errors such as
`ConfigError` derive from it) with a message that names the field or file and what
to do. The command line (`m3jax.cli`) prints such errors as `m3jax CMD: error: ...`
and exits 1; anything else is a bug and keeps its traceback. `user_message` is that
classification, in one place: it also accepts operating-system errors (missing files,
permissions, a read-only or full disk), which are about the user's environment,
never about the code.
"""

from __future__ import annotations

import errno
import os


class UserError(Exception):
  """Bad input (config, path, permission, mismatched artifacts); the message says what
  is wrong and what to do."""


class InputError(UserError, ValueError):
  """A user-supplied value is invalid (still a ValueError for callers that catch those)."""


_ERRNO_HINTS = {
    errno.ENOENT: "no such file or directory",
    errno.EACCES: "permission denied; check its permissions or choose another path",
    errno.EPERM: "operation not permitted; check its permissions or choose another path",
    errno.EROFS: "read-only file system; choose a writable directory",
    errno.ENOSPC: "no space left on the device; free some space or choose another disk",
    errno.EISDIR: "is a directory; expected a file",
    errno.ENOTDIR: "not a directory",
    errno.EEXIST: "already exists",
    errno.ENOTEMPTY: "directory not empty",
}
if hasattr(errno, "EDQUOT"):
  _ERRNO_HINTS[errno.EDQUOT] = "disk quota exceeded; free some space or choose another disk"


def _os_message(e: OSError) -> str:
  """`path: what went wrong; what to do` for an OSError that carries an errno."""
  if e.errno is None or (e.filename is None and not e.strerror):
    return str(e)
  what = _ERRNO_HINTS.get(e.errno, (e.strerror or str(e)).lower())
  if e.filename is None:
    return what
  where = os.fsdecode(e.filename)
  if e.filename2 is not None:
    where += f" -> {os.fsdecode(e.filename2)}"
  return f"{where}: {what}"


def user_message(e: BaseException) -> str | None:
  """The one-line message for a user error, or None when `e` is a bug (keep the traceback)."""
  if isinstance(e, UserError):
    text = str(e)
  elif isinstance(e, OSError):
    text = _os_message(e)
  else:
    return None
  return " ".join(text.split()) or type(e).__name__
