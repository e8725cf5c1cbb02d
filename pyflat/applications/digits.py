"""The one loader of scikit-learn's bundled handwritten digits: 1,797 8x8 images of the
digits 0-9, a real data set that needs no download.

Pixels are scaled to [0, 1] (the file's values 0-16 over 16, exact in every float dtype).
The file is ordered by writer, so its head alone is a biased sample: ``shuffle=True``
draws a fixed permutation (``torch.randperm`` with ``seed``) first. Every application,
benchmark and test fixture reads the digits through :func:`load_digits`.
"""
from __future__ import annotations

import math
import numbers

import torch

__all__ = ["SIZE", "load_digits"]

#: the number of images in the data set
SIZE = 1797


def _integer(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= {minimum}, got "
                        f"{type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def _flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def load_digits(samples: int | None = None, *, dtype: torch.dtype = torch.float64,
                shuffle: bool = False, seed: int = 0, images: bool = False,
                repeat: bool = False, train_size: int | None = None):
    """scikit-learn's digits as tensors ``(X, y)``: X of ``dtype`` with pixels in [0, 1],
    y the labels 0-9 (int64).

    Args:
        samples: how many to take (the first ones, after the shuffle); None: all 1,797.
            More than 1,797 only with ``repeat``.
        dtype: a floating-point dtype for X.
        shuffle: False: the file's order; True: a fixed permutation drawn with ``seed``
            (the same for every call and every ``samples``: a smaller sample is a head of
            a larger one).
        seed: the permutation's seed when ``shuffle`` is True.
        images: X as 1x8x8 images (N, 1, 8, 8) instead of vectors (N, 64).
        repeat: let ``samples`` exceed 1,797 by repeating the (shuffled or ordered) data
            set as many times as needed, for batches larger than the data.
        train_size: split the samples into a training set of the first ``train_size``
            and a test set of the rest; at least 1, and it must leave test samples.

    Returns:
        ``(X, y)``, or ``((X_train, y_train), (X_test, y_test))`` with ``train_size``.

    Raises:
        TypeError, ValueError: an argument of the wrong type or out of range (the message
            names it, what it must be and what came).
        ModuleNotFoundError: scikit-learn is not installed (``pip install scikit-learn``).
    """
    if samples is not None:
        samples = _integer(samples, "samples", 1)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype (torch.float32, "
                        f"torch.float64, ...), got {dtype!r}")
    shuffle, images, repeat = (_flag(shuffle, "shuffle"), _flag(images, "images"),
                               _flag(repeat, "repeat"))
    seed = _integer(seed, "seed", 0)
    if train_size is not None:
        train_size = _integer(train_size, "train_size", 1)
    try:
        from sklearn import datasets
    except ImportError as err:
        raise ModuleNotFoundError("the digits data set comes with scikit-learn: "
                                  "pip install scikit-learn", name="sklearn") from err

    data = datasets.load_digits()
    count = len(data.target)
    if samples is not None and samples > count and not repeat:
        raise ValueError(f"samples must be at most {count:,} (the digits data set; "
                         f"repeat=True repeats it for more), got {samples}")
    X = torch.tensor(data.data, dtype=dtype) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    if shuffle:
        order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
        X, y = X[order], y[order]
    if samples is not None:
        if samples > count:
            copies = math.ceil(samples / count)
            X, y = X.repeat(copies, 1), y.repeat(copies)
        X, y = X[:samples], y[:samples]
    if images:
        X = X.view(-1, 1, 8, 8)
    if train_size is None:
        return X, y
    if train_size >= len(y):
        raise ValueError(f"train_size must leave test images: at most {len(y) - 1} of the "
                         f"{len(y):,} digits, got {train_size}")
    return (X[:train_size], y[:train_size]), (X[train_size:], y[train_size:])
