"""pscnn.cli: how flags and PSCNN_* variables become an optimizer config (no processes)."""
import pytest

from pscnn.cli import DEFAULT_LR, apply_env_defaults, build_parser, main, optimizer_config


def config(argv, environ=None):
    parser = build_parser()
    if environ is not None:
        apply_env_defaults(parser, environ)
    return optimizer_config(parser.parse_args(argv))


@pytest.mark.parametrize("argv,name,lr", [
    (["train"], "sgd", 0.02),
    (["server", "--mode", "sync"], "sgd", 0.04),          # an update averages every worker's batch
    (["run"], "sgd", 0.04),                               # sync is the default mode
    (["run", "--mode", "sync", "--optimizer", "sgd"], "sgd", 0.04),
    (["run", "--mode", "sync", "--lr", "0.01"], "sgd", 0.01),
    (["server", "--mode", "sync", "--optimizer", "adagrad"], "adagrad", 0.01),
    (["run", "--mode", "async"], "adam", 0.001),          # stale gradients: Adam by default
    (["server", "--mode", "ssp"], "adam", 0.001),
    (["run", "--mode", "async", "--momentum", "0.5"], "sgd", 0.02),   # momentum asked for: SGD
    (["run", "--mode", "async", "--nesterov"], "sgd", 0.02),
    (["run", "--mode", "sync", "--optimizer", "adam"], "adam", 0.001),
    (["train", "--optimizer", "adagrad"], "adagrad", 0.01),
    (["run", "--mode", "async", "--lr", "0.005"], "adam", 0.005),
])
def test_auto_optimizer_and_per_optimizer_learning_rate(argv, name, lr):
    cfg = config(argv)
    assert cfg["name"] == name and cfg["lr"] == lr
    if name == "sgd":
        assert cfg["momentum"] == (0.5 if "0.5" in argv else 0.9)
        assert cfg["nesterov"] == ("--nesterov" in argv)
    else:
        assert "momentum" not in cfg


def test_environment_sets_the_optimizer_like_flags():
    assert config(["run", "--mode", "async"], {"PSCNN_OPTIMIZER": "sgd"})["name"] == "sgd"
    assert config(["server", "--mode", "async"], {"PSCNN_MOMENTUM": "0.7"})["momentum"] == 0.7


def test_every_optimizer_has_a_default_rate():
    parser = build_parser()
    choices = next(a.choices for a in parser._subparsers._group_actions[0].choices["train"]._actions
                   if a.dest == "optimizer")
    assert set(choices) == {"auto", *DEFAULT_LR}


def test_an_empty_variable_means_the_flags_default():
    # docker compose passes ${PSCNN_LR:-} as an empty string when the user sets nothing
    assert config(["run", "--mode", "async"], {"PSCNN_LR": "", "PSCNN_OPTIMIZER": " "})["lr"] == 0.001


def test_variables_reach_only_the_command_being_run(capsys, monkeypatch):
    # PSCNN_OPTIMIZER=auto is valid for `pscnn server`, not for `pscnn bench server`.
    parser = build_parser()
    apply_env_defaults(parser, {"PSCNN_OPTIMIZER": "auto"}, argv=["server", "--mode", "async"])
    assert optimizer_config(parser.parse_args(["server", "--mode", "async"]))["name"] == "adam"
    monkeypatch.setenv("PSCNN_OPTIMIZER", "auto")
    assert main(["bench", "server", "--clients", "1"]) == 2
    assert "PSCNN_OPTIMIZER='auto': expected one of sgd" in capsys.readouterr().err
