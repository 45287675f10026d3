"""`toy`: a deterministic, download-free, word-level instruction encoder for the built-in demo.

Each lower-cased word (runs of letters/digits) gets a fixed random vector drawn from a generator seeded
by a hash of `(seed, word)`, so the same word always maps to the same vector on every machine, with no
vocabulary file. A sinusoidal position code is added so word order ("the circle above the square" vs
"the square above the circle") survives. A `<s>` token starts every sequence, so no context is empty.
Images are ignored: the DiT sees the image through the VAE shortcut.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Sequence

import numpy as np

from genmask_jax.encoders.base import TruncationWarner, pad_or_truncate

_WORD = re.compile(r"[a-z0-9]+")
BOS = "<s>"


def tokenize(text: str) -> list[str]:
    return [BOS] + _WORD.findall(text.lower())


def sinusoidal_positions(length: int, dim: int) -> np.ndarray:
    """`(length, dim)` float32, the Transformer position code."""
    half = dim // 2
    freqs = np.exp(-np.log(10_000.0) * np.arange(half) / max(half, 1))
    angles = np.arange(length)[:, None] * freqs[None, :]
    out = np.zeros((length, dim), np.float32)
    out[:, :half], out[:, half : 2 * half] = np.sin(angles), np.cos(angles)
    return out


# Not a method's cache: one keyed by the encoder would keep every encoder alive for the process's life.
@functools.lru_cache(maxsize=65536)
def word_vector(seed: int, dim: int, word: str) -> np.ndarray:
    """`(dim,)` float32, read-only: the vector of `word` under `seed`."""
    digest = hashlib.blake2b(f"{seed}:{word}".encode(), digest_size=8).digest()
    rng = np.random.default_rng(int.from_bytes(digest, "little"))
    vector = rng.standard_normal(dim).astype(np.float32)
    vector.setflags(write=False)
    return vector


class ToyEncoder:
    """`encode(images, texts) -> (context (B, L, D) float32, mask (B, L) bool)`."""

    name = "toy"

    def __init__(self, context_length: int = 32, dim: int = 64, seed: int = 0, position_scale: float = 0.5):
        self.context_length, self.dim, self.seed = context_length, dim, seed
        self.position_scale = position_scale
        self._positions = sinusoidal_positions(context_length, dim) * position_scale
        self._warn = TruncationWarner(self.name)

    def word_vector(self, word: str) -> np.ndarray:
        return word_vector(self.seed, self.dim, word)

    def encode_one(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        words = tokenize(text)
        if len(words) > self.context_length:
            self._warn(len(words), self.context_length, text)
        words = words[: self.context_length]
        states = np.stack([self.word_vector(w) for w in words]) + self._positions[: len(words)]
        return pad_or_truncate(states, self.context_length)

    def encode(
        self, images: Sequence[np.ndarray | None] | None, texts: Sequence[str]
    ) -> tuple[np.ndarray, np.ndarray]:
        del images
        pairs = [self.encode_one(t) for t in texts]
        if not pairs:
            return np.zeros((0, self.context_length, self.dim), np.float32), np.zeros(
                (0, self.context_length), bool
            )
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
