"""Can the stage write where it is told to? One probe before any output is touched, and one translation of the
storage errors a run can still meet later (disk full, permission, object-store access) into what to do."""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile

from vemscale.errors import UserError

MIN_FREE_BYTES = 16 << 20  # below this much free space a run cannot write its first blocks and its ledger

_NO_PERMISSION = ("no permission to write in {where}", "choose an output you can write to, or fix the directory's "
                  "owner/permissions (ls -ld; chmod/chown)")
_FIX = {
    errno.EACCES: _NO_PERMISSION,
    errno.EPERM: _NO_PERMISSION,
    errno.EROFS: ("{where} is on a read-only file system", "choose an output on a writable disk (or remount it rw)"),
    errno.ENOSPC: ("no space left on the device of {where}", "free space there or choose an output on another disk"),
    errno.EDQUOT: ("disk quota exceeded in {where}", "free space within your quota or choose another output"),
}


def _existing_dir(path: str) -> str:
    """The output directory if it exists, else its nearest existing parent (where it would be created)."""
    path = os.path.abspath(path)
    while not os.path.isdir(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_writable(path: str | os.PathLike[str], what: str = "output", min_free: int | None = None) -> None:
    """UserError unless a file can be created (and removed) where local `path` is or would be created, and the
    disk there has `min_free` bytes free (default MIN_FREE_BYTES; env VEMSCALE_MIN_FREE_MB overrides it, 0 turns
    it off for file systems that report no free space, e.g. some FUSE mounts). Nothing is left behind. Remote
    URLs are not probed here (the object store answers their first write; `storage_hint` explains a refusal)."""
    if min_free is None:
        env = os.environ.get("VEMSCALE_MIN_FREE_MB", "").strip()
        min_free = int(float(env) * 2**20) if env else MIN_FREE_BYTES
    if os.path.lexists(path) and not os.path.isdir(path):
        raise UserError(f"{what} {os.fspath(path)!r} exists and is not a directory (a file or a broken link); "
                        "remove it or choose another path")
    where = _existing_dir(os.fspath(path))
    try:
        fd, probe = tempfile.mkstemp(prefix=".vemscale-write-probe-", dir=where)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        problem, fix = _FIX.get(err.errno, ("cannot write in {where} ({err})", "choose another output"))
        raise UserError(f"{what} {os.fspath(path)!r}: {problem.format(where=where, err=err.strerror)}; {fix}") from None
    free = shutil.disk_usage(where).free
    if free < min_free:
        raise UserError(f"{what} {os.fspath(path)!r}: only {free / 2**20:.1f} MiB free on the device of {where} (a run "
                        f"needs at least {min_free / 2**20:.0f} MiB to start); free space there or choose an output "
                        "on another disk (VEMSCALE_MIN_FREE_MB=0 skips this check where a file system reports no "
                        "free space)")


_SIGNS = (  # (text in an error or its remote traceback, errno it stands for)
    ("No space left on device", errno.ENOSPC), ("[OS error 28]", errno.ENOSPC), ("Disk quota exceeded", errno.EDQUOT),
    ("Read-only file system", errno.EROFS), ("Permission denied", errno.EACCES),
)
_CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")


def _credentials_hint() -> str:
    found = [v for v in _CREDENTIAL_VARS if os.environ.get(v)]
    if os.path.exists(os.path.expanduser(os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"))):
        found.append("~/.aws/credentials")
    if not found:
        return ("no AWS credentials were found (AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
                "~/.aws/credentials or a pod/instance role): set them for an account that may read the input and "
                "write the output (public buckets read without them)")
    return (f"the credentials from {', '.join(found)} are not allowed there: use an account with access to the "
            "bucket, or check the bucket name and AWS_ENDPOINT_URL")


def _failed_line(text: str, sign: str) -> str:
    """The line of `text` (a remote traceback included) that holds `sign`, without Ray's colour codes."""
    for line in re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines():
        if sign in line:
            return line.strip()[:400]
    return sign


def access_hint(err: BaseException | str) -> str | None:
    """What to do when an object store answered 403, or None when `err` is not that."""
    text = str(err)
    if "PERMISSION_DENIED" in text or "http_response_code='403'" in text or "AccessDenied" in text:
        return f"the object store refused access (HTTP 403): {_credentials_hint()}"
    return None


def storage_hint(err: BaseException | str) -> str | None:
    """What to do about a storage failure met while running (a full disk, a path without permission, a 403), or
    None when `err` is not one. It quotes the failing line (a remote traceback included), so the path it names
    is the one to fix; finished blocks stay in the ledger, so the advice ends in rerunning the same command."""
    text = str(err)
    if isinstance(err, OSError) and err.errno in _FIX:
        where = repr(err.filename) if err.filename else "a path the run writes or reads"
        problem, fix = _FIX[err.errno]
        return f"{problem.format(where=where)} ({err.strerror}): {fix}; then rerun the same command"
    for sign, code in _SIGNS:
        if sign in text:
            problem, fix = _FIX[code]
            return (f"{problem.format(where='the path in this line')}: {fix}; then rerun the same command, the "
                    f"blocks already written are kept and skipped\n  {_failed_line(text, sign)}")
    return access_hint(err)
