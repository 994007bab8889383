"""The shared one-line-error assertions (tests/helpers.py) catch what they are there to catch."""
from __future__ import annotations

import pytest

from helpers import assert_training_goes_on, assert_training_had_not_finished, error_line, one_line_naming


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


def status(done: int, total: int = 564, over: bool = False) -> dict:
    """The fields of a server's status reply that say how far training is."""
    return {"batches_done": done, "batches_total": total, "done": over}


@pytest.mark.parametrize("answer,left", [
    (status(564, over=True), 1),            # the run was over: the action came too late
    (status(30, over=True), 1),             # over for another reason (it diverged)
    (status(563), 2),                       # one left; the test needed two
])
def test_a_run_over_by_the_test_s_action_fails_naming_the_race(answer, left):
    with pytest.raises(AssertionError) as caught:
        assert_training_goes_on(answer, "killed worker-1", batches_left=left)
    message = one_line_naming(caught.value, "raced the test", "killed worker-1", f"{answer['batches_done']} of 564")
    assert message.endswith("the run is too short for this machine"), message


def test_a_run_still_training_after_the_test_s_action_passes_and_no_answer_fails():
    assert assert_training_goes_on(status(36), "killed worker-1") == status(36)
    assert_training_goes_on(status(562), "paused worker-0", batches_left=2)
    with pytest.raises(AssertionError, match="did not answer a status request after the test killed worker-1"):
        assert_training_goes_on(None, "killed worker-1")


def test_a_server_log_saying_training_finished_fails_naming_the_race():
    log = "00:21:00 INFO    server: listening on tcp://127.0.0.1:5555\n"
    assert_training_had_not_finished(log, "killed the server")
    with pytest.raises(AssertionError) as caught:
        assert_training_had_not_finished(log + "00:21:03 INFO    server: training finished: 188 updates, 12000 "
                                          "samples applied\n", "killed the server")
    one_line_naming(caught.value, "raced the test", "the server had finished training", "killed the server")
