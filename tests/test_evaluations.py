"""server.evaluations: an evaluation's record, the newest one, and the time to accuracy."""
import math

from server.evaluations import EvaluationHistory, evaluation_record


def test_a_record_keeps_a_finite_loss_drops_a_diverged_one_and_rounds_the_seconds_to_milliseconds():
    assert evaluation_record(12.34567, 3, 0.5, 1.25, False) == {
        "seconds": 12.346, "version": 3, "test_accuracy": 0.5, "test_loss": 1.25, "final": False}
    # NaN and Infinity are not JSON: the history goes into summary.json and every checkpoint
    for loss in (math.nan, math.inf, -math.inf):
        assert evaluation_record(1.0, 3, 0.1, loss, True)["test_loss"] is None


def test_the_newest_evaluation_is_of_the_newest_version_not_the_last_report():
    history = EvaluationHistory([evaluation_record(2.0, 5, 0.6, 1.0, False),
                                 evaluation_record(1.0, 3, 0.4, 1.2, False)])
    assert history.newest["version"] == 5              # a checkpoint's history, a slower evaluator's report last
    assert history.record(evaluation_record(1.5, 4, 0.5, 1.1, False))
    assert history.newest["version"] == 5              # a report of older weights, come in later
    final = evaluation_record(2.0, 5, 0.65, 0.9, True)
    assert history.record(final)                       # replaces the periodic record of its version
    assert history.newest is final


def test_time_to_accuracy_is_the_first_by_the_weights_time_whatever_order_the_reports_came_in():
    history = EvaluationHistory()
    history.record(evaluation_record(20.0, 10, 0.96, 0.2, False))
    history.record(evaluation_record(10.0, 5, 0.95, 0.3, False))   # a slower evaluator's report of older weights
    assert history.summary()["time_to_accuracy"]["0.9"] == {"seconds": 10.0, "version": 5}
