"""CIFAR-10 from torchvision's ``cifar-10-batches-py`` folder, read directly.

The batch files are read with ``pickle`` (no checksum test), so any
pixel-identical copy loads, whatever its bytes.  The folder is found from, in
order: an explicit path (``--data``), the ``CURVLAB_DATA`` environment
variable, and ``../shared/data/cifar-10-batches-py`` beside the checkout.
A path may name the ``cifar-10-batches-py`` folder itself or its parent.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch

__all__ = ["find_cifar10", "load_cifar10", "normalize", "MEAN", "STD", "ENV"]

ENV = "CURVLAB_DATA"
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
DEFAULT = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / FOLDER


def _resolve(path: Path) -> Path | None:
    for cand in (path, path / FOLDER):
        if (cand / TRAIN_FILES[0]).is_file():
            return cand
    return None


def find_cifar10(path: str | os.PathLike | None = None) -> Path:
    """The ``cifar-10-batches-py`` folder, or a ``FileNotFoundError`` saying where we looked."""
    tried = []
    candidates = []
    if path is not None:
        candidates.append(("--data", Path(path)))
    elif os.environ.get(ENV):
        candidates.append((ENV, Path(os.environ[ENV])))
    else:
        candidates.append(("default", DEFAULT))
    for source, cand in candidates:
        found = _resolve(cand.expanduser())
        if found is not None:
            return found
        tried.append(f"{cand} (from {source})")
    raise FileNotFoundError(
        f"CIFAR-10 not found at {', '.join(tried)}: expected the folder {FOLDER!r} "
        f"(torchvision's layout, files {TRAIN_FILES[0]}..{TRAIN_FILES[-1]}, {TEST_FILES[0]}). "
        f"Pass --data PATH or set the environment variable {ENV}=PATH.")


def load_cifar10(path=None, train: bool = True, limit: int | None = None):
    """``(X, Y)``: uint8 images ``(N, 3, 32, 32)`` and int64 labels ``(N,)``.

    ``limit`` keeps the first ``limit`` images (in file order), reading only
    the files it needs.
    """
    root = find_cifar10(path)
    xs, ys, have = [], [], 0
    for name in TRAIN_FILES if train else TEST_FILES:
        file = root / name
        if not file.is_file():
            raise FileNotFoundError(f"CIFAR-10 batch file missing: {file}")
        with open(file, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[b"labels"], dtype=np.int64))
        have += len(ys[-1])
        if limit is not None and have >= limit:
            break
    X = torch.from_numpy(np.concatenate(xs))
    Y = torch.from_numpy(np.concatenate(ys))
    if limit is not None:
        X, Y = X[:limit], Y[:limit]
    return X, Y


def normalize(X: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """uint8 images -> float, scaled to [0, 1] and standardised per channel."""
    mean = torch.tensor(MEAN, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=dtype).view(1, 3, 1, 1)
    return (X.to(dtype) / 255 - mean) / std
