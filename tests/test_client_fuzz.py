"""The trainer and the evaluator against a server whose replies hypothesis generates.

The real ``worker.client.Client`` runs with its transport replaced: each request gets the next
reply of a script that hypothesis draws, in this process, with no socket and no timing (the
transport, with its resends and garbage on the wire, is tests/test_client_reliability.py's).  A
reply is any message a server sends, with any body its schema admits, often one that fits the
run (a task of one of its batches, weights of its model, a welcome to it) to get past the field
checks, and weights with one thing wrong (a NaN or Inf, a dtype, shape or array of another model,
a negative BatchNorm variance).  A script that runs out is a silent server.  Whatever the script:

* the trainer and the evaluator end with an exit status, or with an error the CLI prints in one
  line (a PscnnError) or a silent server's (ServerUnreachable); never another exception;
* the weights they train on or score are ones the model can run with: finite, and no state its
  layer refuses.

The server's side of this is tests/test_server_fuzz.py.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cnn_core.errors import PscnnError
from cnn_core.flat import all_finite
from cnn_core.model import build_model
from helpers import ARRAY_FLAWS, with_one_flaw
from pscnn import protocol as P
from test_client_replies import RUN
from test_protocol_properties import valid_bodies
from worker import client as client_module
from worker import evaluator as evaluator_module
from worker.client import Client, ServerUnreachable
from worker.trainer import Trainer

pytestmark = pytest.mark.timeout(300)

FUZZ = settings(deadline=None, derandomize=True, database=None, max_examples=300,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])  # patches that hold for every example
# Small, with state (a BatchNorm's running mean and variance travel with the weights)
MODEL = build_model({"input_shape": [1, 28, 28], "layers": [
    {"type": "conv2d", "out_channels": 2, "kernel": 3, "stride": 2}, {"type": "batchnorm2d", "name": "bn"},
    {"type": "relu"}, {"type": "flatten"}, {"type": "dense", "units": 10}]})
WEIGHTS = {name: np.array(value) for name, value in {**MODEL.params, **MODEL.state}.items()}
BATCHES = RUN["num_samples"] // RUN["batch_size"]
SERVER_SENDS = sorted({P.WELCOME, P.TASK, P.WAIT, P.WEIGHTS, P.HEARTBEAT, P.STATUS, P.ACK, P.STOP, P.ERROR})
# What the trainer and the evaluator score on: 20 images (no MNIST needed)
TEST_SET = (np.random.default_rng(0).random((20, 1, 28, 28), dtype=np.float32), np.arange(20) % 10)


@st.composite
def weights(draw) -> dict:
    """The model's weights, with one thing wrong or none."""
    arrays, flaw = with_one_flaw(draw, WEIGHTS, [None, None, *ARRAY_FLAWS, "variance"])
    if flaw == "variance":
        arrays["bn.running_var"] = np.full_like(arrays["bn.running_var"], draw(st.sampled_from([-1.0, -1e-30])))
    return arrays


def fitting(draw, mtype: str) -> dict:
    """Body fields of an ``mtype`` that fit the run (a task's epoch and batch: or one past its last)."""
    small = st.integers(0, 5)
    return {P.WELCOME: lambda: {"model": MODEL.spec, "run": dict(RUN), "heartbeat_s": 1.0,
                                "incarnation": draw(st.sampled_from(["first", "restarted"]))},
            P.TASK: lambda: {"version": draw(small), "epoch": draw(st.integers(0, RUN["epochs"])),
                             "batch": draw(st.integers(0, BATCHES)), "lease": draw(small), "held_s": 0.0},
            P.WAIT: lambda: {"retry_s": 0.0, "held_s": 0.0},
            P.WEIGHTS: lambda: {"version": draw(small)},
            P.ERROR: lambda: {"code": draw(st.sampled_from(["unknown_worker", "non_finite", "bad_arrays", "full"]))},
            }.get(mtype, dict)()


# What each role asks for: a reply of these types, half the time, gets past the type checks
ANSWERS = {"trainer": [P.TASK, P.WAIT, P.STOP, P.ERROR], "evaluator": [P.WEIGHTS, P.ACK, P.ERROR]}


@st.composite
def replies(draw, role: str, mtype: str | None = None) -> P.Message:
    """One reply of a server to ``role``, as the client decodes it: any message a server sends (``mtype``
    if given; half the time one the role asks for), three times in four one that fits the run."""
    mtype = mtype or draw(st.sampled_from(ANSWERS[role]) | st.sampled_from(SERVER_SENDS))
    body = draw(valid_bodies(mtype))
    if draw(st.integers(0, 3)):
        body.update(fitting(draw, mtype))
    arrays = draw(weights()) if mtype in (P.TASK, P.WEIGHTS) and draw(st.booleans()) else {}
    return P.decode(P.encode(P.Message(mtype, body=body, arrays=arrays)))


def scripts(role: str):
    """What the server answers ``role``'s requests with, in turn; the evaluator's first request is its hello."""
    first = replies(role, P.WELCOME) if role == "evaluator" else replies(role)
    return st.tuples(first, st.lists(replies(role), max_size=10)).map(lambda parts: [parts[0], *parts[1]])


class ScriptedClient(Client):
    """A real Client whose transport answers each request with the next reply of ``script``:
    silence (ServerUnreachable, as from a server gone quiet) once it runs out."""

    def __init__(self, script: list, role: str):
        super().__init__("tcp://127.0.0.1:9", role, heartbeat=False, give_up_after=1.0)
        self.script = list(script)

    def _send_first(self, msg: P.Message) -> tuple[list, float]:
        return [], 0.0

    def _roundtrip(self, msg: P.Message, give_up_after: float | None = None, sent=None) -> P.Message:
        if not self.script:
            raise ServerUnreachable(f"no usable answer from {self.endpoint} (the script ran out)")
        self.last_rtt_s = 0.001
        return self.script.pop(0)


def usable(model) -> bool:
    """Whether ``model``'s weights are ones it can run with: finite, and no state its layer refuses."""
    state = {name: np.asarray(value) for name, value in model.state.items()}
    return (all_finite(model.params.flat) and all(all_finite(value.reshape(-1)) for value in state.values())
            and not any(model.state_problem(name, value) for name, value in state.items()))


@pytest.fixture
def no_pauses(monkeypatch):
    """No pause between failed requests, and the shortest sleep on a wait: the script decides, not the clock."""
    monkeypatch.setattr(client_module, "FAILURE_PAUSE_S", 0.0)
    monkeypatch.setattr(client_module, "MAX_RETRY_S", client_module.MIN_RETRY_S)


@FUZZ
@given(script=scripts("trainer"), overlap=st.booleans())
def test_a_trainer_given_any_replies_ends_in_one_line_and_trains_on_usable_weights_only(no_pauses, script,
                                                                                         overlap):
    client = ScriptedClient(script, "trainer")
    trainer = Trainer(client, compute_ms=0.0, overlap=overlap)      # synthetic: zero gradients, no MNIST
    trainer.setup(P.Message(P.WELCOME, body={"model": MODEL.spec, "run": dict(RUN), "heartbeat_s": 1.0,
                                             "incarnation": "first", "worker_id": client.wid, "role": "trainer"}))
    computed = []
    compute = trainer.compute

    def checked_compute(task: dict):
        computed.append(usable(trainer.model))
        return compute(task)
    trainer.compute = checked_compute
    try:
        assert trainer.work() == 0
    except (PscnnError, ServerUnreachable):
        pass
    finally:
        client.close()
    assert all(computed), computed


@FUZZ
@given(script=scripts("evaluator"))
def test_an_evaluator_given_any_replies_ends_in_one_line_and_scores_usable_weights_only(no_pauses, monkeypatch,
                                                                                        script):
    scored = []
    score = evaluator_module._score

    def checked_score(model, test):
        scored.append(usable(model))
        return score(model, test)
    client = ScriptedClient(script, "evaluator")
    monkeypatch.setattr(evaluator_module, "Client", lambda *args, **kwargs: client)
    monkeypatch.setattr(evaluator_module, "check_local_setup", lambda *args, **kwargs: None)
    monkeypatch.setattr(evaluator_module, "load_mnist", lambda *args, **kwargs: TEST_SET)
    monkeypatch.setattr(evaluator_module, "_score", checked_score)
    try:
        assert evaluator_module.run_evaluator(client.endpoint, every=0.0, nice=0) in (0, 1)
    except (PscnnError, ServerUnreachable):
        pass
    assert all(scored), scored
