"""Counting and logging skipped examples (bad input never crashes a worker, and is never silent)."""

from __future__ import annotations

import builtins
import collections
import errno
import logging
import os
import re
import threading

log = logging.getLogger(__name__)


class BadExample(ValueError):
    """An example that cannot be used; `kind` names the reason in skip summaries."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(detail)
        self.kind = kind


def skip_reason(error: Exception) -> str:
    """ "kind: detail" for the skip log; `kind` is BadExample's kind or the exception's class name."""
    kind = error.kind if isinstance(error, BadExample) else type(error).__name__
    return f"{kind}: {error}"


# Exceptions that do not blame an example's data (skip reasons name the class): the evaluation job gives
# an example that failed so (or with a `transient` I/O error) no record, so that a rerun retries it
# instead of leaving it out for good; the embedding precompute tries such a read again. (A
# `ContextError`, a setting or a cache to fix, never gets this far: the data pipeline raises it.)
RETRIED_ERRORS = (MemoryError, ConnectionError, TimeoutError, InterruptedError)


# Errnos of a read that can pass on its own: an I/O error (a network file system's, a disk's), a stale NFS
# handle (the server restarted), a resource busy or temporarily unavailable (soft mounts), the network
# under a mount down or reset, a timeout, an interrupted call. Any other (a missing file, EACCES) fails the
# same way on every try, as does an image that does not decode.
TRANSIENT_ERRNOS = frozenset({
    errno.EIO, errno.ESTALE, errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.EINTR,
    errno.ENETDOWN, errno.ENETUNREACH,
})

# riegeli (array_record's files, tfds data sources) reports a failed system call as a RuntimeError
# "pread() failed: Input/output error; reading /path ..."
_SYSTEM_CALL_FAILED = re.compile(r"\w+\(\) failed: ([^;\[\n]+)")
_ERRNOS = {os.strerror(code): code for code in errno.errorcode}
_ERRNO_IN_MESSAGE = re.compile(r"\[Errno (\d+)\]")


def io_errno(error: BaseException) -> int | None:
    """The errno of the failed system call behind `error`: an OSError's, or the one riegeli's RuntimeError
    names by its message; None for any other error (corrupt data)."""
    if isinstance(error, OSError):
        return error.errno
    match = _SYSTEM_CALL_FAILED.search(str(error)) if isinstance(error, RuntimeError) else None
    return _ERRNOS.get(match.group(1).strip()) if match else None


def transient(error: BaseException) -> bool:
    """Whether a failed read may succeed when tried again: one of `RETRIED_ERRORS` (memory, a connection,
    a timeout, an interrupt) or an I/O error whose errno is in `TRANSIENT_ERRNOS`, raised as an OSError
    or, by array_record files (tfds data sources), as the RuntimeError of a failed system call."""
    return isinstance(error, RETRIED_ERRORS) or io_errno(error) in TRANSIENT_ERRNOS


def is_data_error(reason: str | None) -> bool:
    """Whether a skip reason ("kind: detail", `skip_reason`) blames the example's data, i.e. is not
    `transient` as far as the reason tells (its class, an "[Errno N]" or a riegeli system call's error in
    its detail); an unknown reason (None) does."""
    if reason is None:
        return True
    kind, _, detail = (part.strip() for part in reason.partition(":"))
    error = getattr(builtins, kind, None)
    if isinstance(error, type) and issubclass(error, RETRIED_ERRORS):
        return False
    code = _ERRNO_IN_MESSAGE.search(detail)
    if code is not None:
        return int(code.group(1)) not in TRANSIENT_ERRNOS
    call = _SYSTEM_CALL_FAILED.search(detail) if kind == "RuntimeError" else None
    return not (call and _ERRNOS.get(call.group(1).strip()) in TRANSIENT_ERRNOS)


class SkipLog:
    """Thread-safe record of skipped examples: each skip is logged with its example id and reason
    (the first `log_first` at WARNING, the rest at INFO) and counted by reason, in `unit`s."""

    def __init__(self, name: str, log_first: int = 100, unit: str = "examples"):
        self.name, self.log_first, self.unit = name, log_first, unit
        self._lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()
        self.examples: list[tuple[str, str]] = []
        self._logged_epochs: set[tuple[str, int]] = set()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, example_id: str, reason: str, count: int = 1) -> None:
        """One skip of `count` units (a RefCOCO ref: its sentences)."""
        kind = reason.split(":", 1)[0]
        with self._lock:
            self.counts[kind] += count
            n = self.total
            if len(self.examples) < 10_000:
                self.examples.append((example_id, reason))
        level = logging.WARNING if n <= self.log_first else logging.INFO
        what = example_id if count == 1 else f"{example_id} ({count} {self.unit})"
        log.log(level, "%s: skipped %s (%s) [%d skipped so far]", self.name, what, reason, n)

    def summary(self) -> str:
        with self._lock:
            if not self.counts:
                return f"{self.name}: no {self.unit} skipped"
            parts = ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items()))
            return f"{self.name}: {self.total} {self.unit} skipped ({parts})"

    def log_epoch_summary(self, task: str, epoch: int) -> None:
        """Logs the summary once when the first element of `epoch` (> 0) of `task` is produced."""
        with self._lock:
            if epoch == 0 or (task, epoch) in self._logged_epochs:
                return
            self._logged_epochs.add((task, epoch))
        log.info("end of %s epoch %d: %s", task, epoch - 1, self.summary())
