"""Failures of the platform's storage, told apart from failures of a run.

A full or read-only archive is not the run's fault: the job must wait and run again once the archive takes
writes, never end ``failed`` (and never hide the cause behind a half-written notebook's ``NotJSONError``).
"""

from __future__ import annotations

import errno

#: Errors of a file system that cannot take writes now (full, read-only, over quota).
ARCHIVE_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EDQUOT})


def archive_fault(exc: BaseException | None) -> OSError | None:
    """The file-system error behind ``exc`` (its causes and contexts included) when it is one of
    :data:`ARCHIVE_ERRNOS`; None otherwise."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in ARCHIVE_ERRNOS:
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None
