"""A checkpoint damaged after it was written (a shard truncated, deleted or grown) is detected from the
size manifest in its state file: `auto` falls back to the newest intact checkpoint and says which
file is damaged; a named checkpoint is refused with the file and the intact alternative."""

import json
import os

import pytest

from dft_ds.checkpoint import (LATEST, STATE_FILE, CheckpointError, file_manifest, find_damage, find_resume,
                               tag_for, write_atomic)


def make_checkpoint(root, step: int, latest: bool = True) -> str:
    tag_dir = os.path.join(root, tag_for(step))
    os.makedirs(os.path.join(tag_dir, "rng"))
    for rel, size in (("zero_pp_rank_0_mp_rank_00_model_states.pt", 300), ("rng/rank0.pt", 40),
                      ("bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", 900)):
        with open(os.path.join(tag_dir, rel), "wb") as fh:
            fh.write(os.urandom(size))
    state = {"global_step": step, "world_size": 1, "zero_stage": 3, "files": file_manifest(tag_dir)}
    write_atomic(os.path.join(tag_dir, STATE_FILE), json.dumps(state))
    if latest:
        write_atomic(os.path.join(root, LATEST), tag_for(step) + "\n")
    return tag_dir


def test_manifest_lists_every_file_but_the_state_file(tmp_path):
    tag_dir = make_checkpoint(str(tmp_path), 2)
    files = json.load(open(os.path.join(tag_dir, STATE_FILE)))["files"]
    assert files == {"bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt": 900, "rng/rank0.pt": 40,
                     "zero_pp_rank_0_mp_rank_00_model_states.pt": 300}
    # Taken again with the state file present (as a resume does): the state file is still left out.
    assert os.path.isfile(os.path.join(tag_dir, STATE_FILE)) and file_manifest(tag_dir) == files


@pytest.mark.parametrize("harm, expected", [
    ("truncate", "is 100 bytes, but 900 were written"),
    ("delete", "is missing"),
    ("grow", "is 901 bytes, but 900 were written"),
])
def test_each_kind_of_damage_is_named(tmp_path, harm, expected):
    tag_dir = make_checkpoint(str(tmp_path), 2)
    shard = os.path.join(tag_dir, "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    if harm == "truncate":
        os.truncate(shard, 100)
    elif harm == "delete":
        os.remove(shard)
    else:
        with open(shard, "ab") as fh:
            fh.write(b"x")
    state = json.load(open(os.path.join(tag_dir, STATE_FILE)))
    damage = find_damage(tag_dir, state)
    assert damage == f"{shard} {expected}"


def test_intact_checkpoint_has_no_damage_and_old_ones_without_manifest_pass(tmp_path):
    tag_dir = make_checkpoint(str(tmp_path), 2)
    assert find_damage(tag_dir, json.load(open(os.path.join(tag_dir, STATE_FILE)))) is None
    assert find_damage(tag_dir, {"global_step": 2}) is None


def test_auto_falls_back_to_the_newest_intact_checkpoint_and_says_why(tmp_path):
    root = str(tmp_path)
    make_checkpoint(root, 2)
    make_checkpoint(root, 4)
    latest = make_checkpoint(root, 6)
    os.truncate(os.path.join(latest, "zero_pp_rank_0_mp_rank_00_model_states.pt"), 10)
    warnings = []
    point = find_resume("auto", root, warnings.append)
    assert point.tag == "step-4"
    assert any("step-6 is damaged" in w and "model_states.pt is 10 bytes" in w for w in warnings)
    assert any("resuming from" in w and "step-4" in w for w in warnings)
    # The same through an explicit checkpoints/ directory.
    assert find_resume(root, "unused", warnings.append).tag == "step-4"


def test_named_damaged_checkpoint_is_refused_with_the_file_and_the_alternative(tmp_path):
    root = str(tmp_path)
    make_checkpoint(root, 2)
    latest = make_checkpoint(root, 4)
    os.remove(os.path.join(latest, "rng", "rank0.pt"))
    with pytest.raises(CheckpointError) as err:
        find_resume(latest, "unused")
    message = str(err.value)
    assert "rng/rank0.pt is missing" in message
    assert os.path.join(root, "step-2") in message


def test_every_checkpoint_damaged_is_an_error(tmp_path):
    root = str(tmp_path)
    only = make_checkpoint(root, 2)
    os.truncate(os.path.join(only, "rng", "rank0.pt"), 0)
    with pytest.raises(CheckpointError, match="no older intact checkpoint"):
        find_resume("auto", root, lambda _m: None)


def test_incomplete_latest_falls_back(tmp_path):
    root = str(tmp_path)
    make_checkpoint(root, 2)
    latest = make_checkpoint(root, 4)
    os.remove(os.path.join(latest, STATE_FILE))
    warnings = []
    assert find_resume("auto", root, warnings.append).tag == "step-2"
    assert any("step-4 is incomplete" in w for w in warnings)
