"""The shared one-line-error assertions (tests/helpers.py) catch what they are there to catch."""
from __future__ import annotations

import pytest

from helpers import error_line, one_line_naming


@pytest.mark.parametrize("stderr,how", [
    ("Traceback (most recent call last):\npscnn: error: bad --x", {}),
    ("pscnn: error: bad --y\npscnn: error: bad --x", {}),                  # two errors reported
    ("pscnn: error: bad --x\nsomething after it", {}),                      # the error does not end it
    ("usage: pscnn server ...\npscnn server: error: bad --x", {}),         # not the expected prefix
    ("usage: pscnn server ...\npscnn server: error: bad --x", {"starts": "pscnn server: error: ", "alone": True}),
    ("pscnn: error: bad --y", {}),                                          # does not name --x
    ("", {}),
])
def test_error_line_refuses(stderr, how):
    with pytest.raises(AssertionError):
        error_line(stderr, "--x", **how)


@pytest.mark.parametrize("stderr,how", [
    ("pscnn: error: bad --x\n", {"alone": True}),
    ("usage: pscnn server ...\npscnn server: error: bad --x", {"starts": "pscnn server: error: "}),
    # a progress line quoting a worker's error does not report one itself
    ("pscnn bench tta: run 1: worker-0 exited with 1: pscnn: error: bad\npscnn bench tta: error: bad --x",
     {"starts": "pscnn bench "}),
])
def test_error_line_accepts(stderr, how):
    assert error_line(stderr, "--x", **how) == stderr.strip().splitlines()[-1]


def test_one_line_naming_takes_an_exception_and_refuses_two_lines(tmp_path):
    assert one_line_naming(ValueError(f"{tmp_path}: bad"), tmp_path) == f"{tmp_path}: bad"
    with pytest.raises(AssertionError):
        one_line_naming(ValueError(f"{tmp_path}:\nbad"), tmp_path)
