"""Counting and logging skipped examples (bad input never crashes a worker, and is never silent)."""

from __future__ import annotations

import builtins
import collections
import logging
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
# an example that failed so no record, so that a rerun retries it instead of leaving it out for good. (A
# `ContextError`, a setting or a cache to fix, never gets this far: the data pipeline raises it.)
RETRIED_ERRORS = (MemoryError, ConnectionError, TimeoutError, InterruptedError)


def is_data_error(reason: str | None) -> bool:
    """Whether a skip reason ("kind: detail", `skip_reason`) blames the example's data; an unknown
    reason (None) does."""
    if reason is None:
        return True
    kind = reason.split(":", 1)[0].strip()
    error = getattr(builtins, kind, None)
    return not (isinstance(error, type) and issubclass(error, RETRIED_ERRORS))


class SkipLog:
    """Thread-safe record of skipped examples: each skip is logged with its example id and reason
    (the first `log_first` at WARNING, the rest at INFO) and counted by reason."""

    def __init__(self, name: str, log_first: int = 100):
        self.name, self.log_first = name, log_first
        self._lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()
        self.examples: list[tuple[str, str]] = []
        self._logged_epochs: set[tuple[str, int]] = set()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, example_id: str, reason: str) -> None:
        kind = reason.split(":", 1)[0]
        with self._lock:
            self.counts[kind] += 1
            n = self.total
            if len(self.examples) < 10_000:
                self.examples.append((example_id, reason))
        level = logging.WARNING if n <= self.log_first else logging.INFO
        log.log(level, "%s: skipped %s (%s) [%d skipped so far]", self.name, example_id, reason, n)

    def summary(self) -> str:
        with self._lock:
            if not self.counts:
                return f"{self.name}: no examples skipped"
            parts = ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items()))
            return f"{self.name}: {self.total} examples skipped ({parts})"

    def log_epoch_summary(self, task: str, epoch: int) -> None:
        """Logs the summary once when the first element of `epoch` (> 0) of `task` is produced."""
        with self._lock:
            if epoch == 0 or (task, epoch) in self._logged_epochs:
                return
            self._logged_epochs.add((task, epoch))
        log.info("end of %s epoch %d: %s", task, epoch - 1, self.summary())
