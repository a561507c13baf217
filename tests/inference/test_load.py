"""Every tool that takes a checkpoint resolves it with ``find_checkpoint``: a step folder, a run's
checkpoints folder or the run folder above it; a wrong level is one line that names what to pass.
(The forms against a real run: tests/train/test_app.py.)"""

from __future__ import annotations

import pytest

from moe_morpheus.train.checkpoint import CheckpointError, find_checkpoint


def test_wrong_levels_name_the_folder_to_pass(tmp_path):
    step = tmp_path / "run" / "checkpoints" / "step_00000004"
    step.mkdir(parents=True)
    (step / "common.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="step_00000004 has no checkpoint.json: a save that did not complete; "
                                              "pass the checkpoints folder"):
        find_checkpoint(step)
    (step / "checkpoint.json").write_text("{}")
    with pytest.raises(CheckpointError, match=f"common.pt is a file, not a checkpoint folder: pass {step}, the folder"):
        find_checkpoint(step / "common.pt")
    with pytest.raises(CheckpointError, match="nowhere does not exist: pass a run's checkpoints folder, the run "
                                              "folder above it or one step_\\* folder in it"):
        find_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        find_checkpoint(tmp_path)
