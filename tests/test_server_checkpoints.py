"""server.checkpoints.CheckpointFile: what the last checkpoint written holds, and whose it is."""
from cnn_core.checkpoint import load_checkpoint
from cnn_core.model import build_model
from server.checkpoints import CheckpointFile

EXTRA = {"work": {"epoch": 0, "applied": [1]}, "train_seconds": 5.0, "wall_seconds": 6.0}


def test_a_checkpoint_differing_only_in_its_clocks_is_unchanged_any_other_change_is_not(tmp_path):
    ckpt = CheckpointFile(str(tmp_path))
    ckpt.write(build_model("light"), None, 3, EXTRA)
    assert ckpt.unchanged(3, {**EXTRA, "train_seconds": 9.0, "wall_seconds": 60.0})
    assert not ckpt.unchanged(4, EXTRA)                                     # new weights
    assert not ckpt.unchanged(3, {**EXTRA, "work": {"epoch": 0, "applied": [1, 2]}})


def test_a_checkpoint_written_records_its_version_and_final_evaluation_and_restarts_the_period(tmp_path):
    ckpt = CheckpointFile(str(tmp_path))
    assert not ckpt.from_before_this_server() and ckpt.last_text() == "nothing: no checkpoint was written yet"
    ckpt.period_start = 0.0
    ckpt.write(build_model("light"), None, 3, EXTRA)
    assert load_checkpoint(ckpt.path)[1]["step"] == 3
    assert ckpt.version == 3 and not ckpt.holds_final_eval and ckpt.period_start > 0.0
    assert not ckpt.from_before_this_server() and ckpt.last_text() == "version 3, the last checkpoint written"
    ckpt.write(build_model("light"), None, 3, {**EXTRA, "final_eval": {"test_accuracy": 0.5}})
    assert ckpt.holds_final_eval
    # a server started on that folder: the checkpoint is an earlier server's
    later = CheckpointFile(str(tmp_path))
    assert later.from_before_this_server()
    assert later.last_text() == "the checkpoint there already (from before this server started)"
