"""The instruction-encoder interface shared by every encoder.

An encoder turns images and texts into the DiT's cross-attention context:
`encode(images, texts) -> (context float32 (B, L, D), mask bool (B, L))` with a fixed `L`
(`context_length`): shorter sequences are padded with zeros (mask False). A longer `qwen2_5_vl` prompt
with an image raises `PromptTooLong` (its instruction comes last, so cutting the prompt would cut the
instruction); longer texts alone (`toy`, `qwen2_5_vl` captions) are truncated with a warning.
`images` is a sequence of uint8 `(H, W, 3)` arrays (or None entries / None for text-only encoders such
as `toy`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

log = logging.getLogger(__name__)


@runtime_checkable
class InstructionEncoder(Protocol):
    name: str
    context_length: int
    dim: int

    def encode(
        self, images: Sequence[np.ndarray | None] | None, texts: Sequence[str]
    ) -> tuple[np.ndarray, np.ndarray]: ...


class ContextError(Exception):
    """A context cannot be produced as configured (a setting or a cache to fix, not a bad example):
    the data pipelines raise it instead of skipping the example."""


class EncoderUnavailable(ContextError):
    """The configured encoder cannot run here: a package it needs is not installed, or its model folder
    is not on this machine."""


class PromptTooLong(ContextError, ValueError):
    """A prompt longer than `context_length`; `index` is its position in the encoded batch."""

    def __init__(self, message: str, index: int = 0):
        super().__init__(message)
        self.index = index


class TruncationWarner:
    """Logs truncations: the first few with their text, then every 1000th, with a running count."""

    def __init__(self, name: str, first: int = 5):
        self.name, self.first, self.count = name, first, 0

    def __call__(self, length: int, limit: int, text: str) -> None:
        self.count += 1
        if self.count <= self.first or self.count % 1000 == 0:
            log.warning(
                "%s: %d tokens truncated to context_length=%d (%d truncations so far): %.80r",
                self.name,
                length,
                limit,
                self.count,
                text,
            )


def pad_or_truncate(states: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """`(T, D)` -> `(length, D)` zero-padded or cut, and its bool mask `(length,)`."""
    n = min(states.shape[0], length)
    out = np.zeros((length, states.shape[1]), np.float32)
    out[:n] = states[:n]
    mask = np.zeros((length,), bool)
    mask[:n] = True
    return out, mask
