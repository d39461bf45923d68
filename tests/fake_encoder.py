"""A deterministic stand-in for BiEncoder: hashed character 3-gram vectors, L2-normalised.

Used where a test is about index/retrieval logic and needs similarities it can predict.
"""

from __future__ import annotations

import hashlib

import numpy as np


class FakeEncoder:
    precision = "fp32"  # what BiEncoder.precision says: the vectors are exact float32

    def __init__(self, dim: int = 64, salt: str = ""):
        self.dim = dim
        self.salt = salt
        self.model_hash = hashlib.sha256(f"fake-{dim}-{salt}".encode()).hexdigest()
        self.calls: list[int] = []

    def _vector(self, text: str) -> np.ndarray:
        v = np.zeros(self.dim, np.float32)
        padded = f"  {text}  "
        for i in range(len(padded) - 2):
            h = int(hashlib.md5((self.salt + padded[i:i + 3]).encode()).hexdigest()[:8], 16)
            v[h % self.dim] += 1.0
        n = np.linalg.norm(v)
        return v / n if n else v

    def encode(self, texts, show_progress: bool = False) -> np.ndarray:
        self.calls.append(len(texts))
        if not len(texts):
            return np.zeros((0, self.dim), np.float32)
        return np.stack([self._vector(t) for t in texts]).astype(np.float32)

    def fingerprint(self) -> dict:
        return {"path": "fake", "model_hash": self.model_hash, "pooling": "mean",
                "max_length": 32, "prefix": "", "normalize": True, "dim": self.dim,
                "model_type": "fake", "normalisation": "nfkc-lower-ws"}
