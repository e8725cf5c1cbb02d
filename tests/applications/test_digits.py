"""The one digits loader: its options, and errors that say what was wrong."""
import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits as sklearn_digits

from pyflat.applications.digits import SIZE, load_digits


@pytest.fixture(scope="module")
def raw():
    data = sklearn_digits()
    return data.data, data.target


def test_all_digits_in_file_order_scaled_to_the_unit_interval(raw):
    X, y = load_digits()
    assert X.shape == (SIZE, 64) and X.dtype == torch.float64 and y.dtype == torch.long
    assert len(raw[1]) == SIZE
    assert torch.equal(X * 16, torch.tensor(raw[0]))
    assert torch.equal(y, torch.tensor(raw[1]))
    assert X.min() == 0 and X.max() == 1


def test_samples_are_the_head_in_any_float_dtype(raw):
    X, y = load_digits(300, dtype=torch.float32)
    assert X.dtype == torch.float32 and X.shape == (300, 64)
    assert torch.equal(X, torch.tensor(raw[0][:300], dtype=torch.float32) / 16)
    assert torch.equal(y, torch.tensor(raw[1][:300]))


def test_shuffled_with_a_fixed_seed(raw):
    X, y = load_digits(shuffle=True)
    order = torch.randperm(SIZE, generator=torch.Generator().manual_seed(0))
    assert torch.equal(y, torch.tensor(raw[1])[order])
    assert torch.equal(X, torch.tensor(raw[0])[order] / 16)
    # a smaller sample is the head of the larger; another seed, another order
    X100, y100 = load_digits(100, shuffle=True)
    assert torch.equal(X100, X[:100]) and torch.equal(y100, y[:100])
    assert not torch.equal(load_digits(100, shuffle=True, seed=1)[1], y100)
    # the permutation does not depend on the global generator
    torch.manual_seed(123)
    assert torch.equal(load_digits(100, shuffle=True)[1], y100)


def test_images(raw):
    X, y = load_digits(10, images=True)
    assert X.shape == (10, 1, 8, 8)
    assert torch.equal(X[3, 0], torch.tensor(raw[0][3]).view(8, 8) / 16)


def test_repeated_past_the_data_set(raw):
    X, y = load_digits(2 * SIZE + 5, dtype=torch.float32, repeat=True)
    assert X.shape == (2 * SIZE + 5, 64) and len(y) == 2 * SIZE + 5
    assert torch.equal(X[SIZE:2 * SIZE], X[:SIZE]) and torch.equal(X[2 * SIZE:], X[:5])
    assert torch.equal(y[2 * SIZE:], torch.tensor(raw[1][:5]))
    # repeat changes nothing within the data set
    assert torch.equal(load_digits(50, repeat=True)[0], load_digits(50)[0])


def test_train_test_split():
    (X_train, y_train), (X_test, y_test) = load_digits(shuffle=True, train_size=1200)
    X, y = load_digits(shuffle=True)
    assert len(y_train) == 1200 and len(y_test) == SIZE - 1200
    assert torch.equal(torch.cat([X_train, X_test]), X)
    assert torch.equal(torch.cat([y_train, y_test]), y)
    (_, y_small), (_, y_rest) = load_digits(10, train_size=7)
    assert len(y_small) == 7 and len(y_rest) == 3


@pytest.mark.parametrize("kwargs, error, message", [
    ({"samples": 0}, ValueError, "samples must be an integer >= 1, got 0"),
    ({"samples": 2.5}, TypeError, "samples must be an integer >= 1, got float 2.5"),
    ({"samples": True}, TypeError, "samples must be an integer >= 1, got bool True"),
    ({"samples": SIZE + 1}, ValueError, "samples must be at most 1,797 \\(the digits data set; "
                                        "repeat=True repeats it for more\\), got 1798"),
    ({"dtype": torch.long}, TypeError, "dtype must be a floating-point torch.dtype .*, got "
                                       "torch.int64"),
    ({"dtype": np.float32}, TypeError, "dtype must be a floating-point torch.dtype"),
    ({"shuffle": 1}, TypeError, "shuffle must be True or False, got int 1"),
    ({"images": "yes"}, TypeError, "images must be True or False, got str 'yes'"),
    ({"repeat": None}, TypeError, "repeat must be True or False, got NoneType None"),
    ({"seed": -1}, ValueError, "seed must be an integer >= 0, got -1"),
    ({"train_size": 0}, ValueError, "train_size must be an integer >= 1, got 0"),
    ({"train_size": SIZE}, ValueError, "train_size must leave test images: at most 1796 of "
                                       "the 1,797 digits, got 1797"),
    ({"samples": 20, "train_size": 20}, ValueError, "train_size must leave test images: at "
                                                    "most 19 of the 20 digits, got 20"),
], ids=lambda v: None if isinstance(v, (dict, type)) else v[:30])
def test_errors_name_the_argument(kwargs, error, message):
    with pytest.raises(error, match=message):
        load_digits(**kwargs)


def test_missing_scikit_learn_names_the_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn raises ImportError
    with pytest.raises(ModuleNotFoundError, match="pip install scikit-learn") as raised:
        load_digits(10)
    assert raised.value.name == "sklearn"
