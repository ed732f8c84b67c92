"""Content hashes (checkpoint.verify=hash): each rank hashes the shards it wrote, rank 0 merges them
with its own into the state file, which is sealed with a hash of itself. A flipped byte anywhere --
a model shard, an optimizer shard, the state file -- is found; `size` and `off` look less far."""

import json
import os

import pytest

from dft_ds.checkpoint import (HASH_DIR, LATEST, STATE_FILE, file_hash, file_manifest, find_damage, find_resume,
                               own_files,
                               hash_own_shards, merge_hashes, rank_of, read_state, tag_for, write_atomic, write_state,
                               CheckpointError)

MODEL = "zero_pp_rank_1_mp_rank_00_model_states.pt"
OPTIM = "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"


def flip(path: str, offset: int | None = None) -> None:
    """Flip the lowest bit of one byte (the middle one by default): same size, other content."""
    with open(path, "r+b") as fh:
        data = bytearray(fh.read())
        at = len(data) // 2 if offset is None else offset
        data[at] ^= 1
        fh.seek(0)
        fh.write(data)


def save_like_two_ranks(root, step: int) -> str:
    """What Checkpointer.save leaves: two ranks' ZeRO-3 shards and RNG states, each rank's hashes
    merged by rank 0 with those of its own files, and the sealed state file; `latest` names it."""
    tag_dir = os.path.join(root, tag_for(step))
    os.makedirs(os.path.join(tag_dir, "rng"))
    os.makedirs(os.path.join(tag_dir, "hf_config"))
    for rank in (0, 1):
        for rel, size in ((f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt", 3000),
                          (f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", 9000), (f"rng/rank{rank}.pt", 400)):
            with open(os.path.join(tag_dir, rel), "wb") as fh:
                fh.write(os.urandom(size))
    with open(os.path.join(tag_dir, "hf_config", "config.json"), "w") as fh:
        json.dump({"model_type": "llama"}, fh)
    own = [hash_own_shards(tag_dir, rank) for rank in (0, 1)]
    assert sorted(own[1]) == sorted([MODEL, OPTIM, "rng/rank1.pt"])
    hashes = merge_hashes(tag_dir)
    state = {"global_step": step, "world_size": 2, "zero_stage": 3, "sampler": {"epoch": 0, "position": 8},
             "config": {"train": {"lr": 1e-5, "output_dir": "runs/x"}}, "files": file_manifest(tag_dir),
             "hash": "xxh3_128", "hashes": hashes}
    write_state(tag_dir, state)
    write_atomic(os.path.join(root, LATEST), tag_for(step) + "\n")
    return tag_dir


def test_a_rank_hashes_its_files_while_a_peer_renames_its_temporary_ones(tmp_path):
    """Rank 0 hashes its shards while rank 1 is still writing: rank 1's hashes/rank1.json.tmp-<pid>
    can vanish between the directory listing and a look at it (a dangling link here, deterministic).
    That failed a checkpoint save in CI with ENOENT; only rank 0's own files may be touched."""
    tag_dir = tmp_path / "step-3"
    (tag_dir / "rng").mkdir(parents=True)
    (tag_dir / HASH_DIR).mkdir()
    for rel in ("zero_pp_rank_0_mp_rank_00_model_states.pt", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
                "rng/rank0.pt", OPTIM):
        (tag_dir / rel).write_bytes(os.urandom(500))
    os.symlink(tag_dir / HASH_DIR / "gone", tag_dir / HASH_DIR / "rank1.json.tmp-4242")  # renamed away meanwhile
    link = tag_dir / HASH_DIR / "rank1.json.tmp-4242"
    assert os.path.islink(link) and not os.path.exists(link)  # listed, but gone when looked at
    mine = hash_own_shards(str(tag_dir), 0)
    assert sorted(mine) == ["bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "rng/rank0.pt",
                            "zero_pp_rank_0_mp_rank_00_model_states.pt"]
    assert all(mine[rel] == file_hash(tag_dir / rel) for rel in mine)
    assert own_files(str(tag_dir), 1) == [OPTIM]


def test_each_file_is_hashed_by_the_rank_that_wrote_it_and_all_are_recorded(tmp_path):
    assert rank_of(MODEL) == 1 and rank_of(OPTIM) == 1 and rank_of("rng/rank1.pt") == 1
    assert rank_of("zero_pp_rank_0_mp_rank_00_optim_states.pt") == 0 and rank_of("rng/rank12.pt") == 12
    assert rank_of("mp_rank_00_model_states.pt") is None and rank_of("hf_config/config.json") is None
    tag_dir = save_like_two_ranks(str(tmp_path), 2)
    state = read_state(tag_dir)
    assert not os.path.exists(os.path.join(tag_dir, HASH_DIR))  # merged and removed
    assert sorted(state["hashes"]) == sorted(state["files"]) and len(state["files"]) == 7
    for rel, digest in state["hashes"].items():
        assert file_hash(os.path.join(tag_dir, rel)) == digest
    assert find_damage(tag_dir, state) is None


@pytest.mark.parametrize("rel", [MODEL, OPTIM])
def test_a_flipped_byte_in_a_shard_is_found_by_hash_only(tmp_path, rel):
    tag_dir = save_like_two_ranks(str(tmp_path), 2)
    flip(os.path.join(tag_dir, rel))
    state = read_state(tag_dir)
    assert find_damage(tag_dir, state, "hash") == (
        f"{os.path.join(tag_dir, rel)} has other content than was written (its xxh3_128 hash differs from the one "
        f"in {STATE_FILE}; the size is the same)")
    assert find_damage(tag_dir, state, "size") is None
    assert find_damage(tag_dir, state, "off") is None


def test_every_single_bit_flip_of_the_state_file_is_found(tmp_path):
    tag_dir = save_like_two_ranks(str(tmp_path), 2)
    path = os.path.join(tag_dir, STATE_FILE)
    original = open(path, "rb").read()
    missed = []
    for offset in range(len(original)):
        flip(path, offset)
        try:
            state = read_state(tag_dir)
        except CheckpointError:
            pass  # no longer JSON, or a required field broken: an incomplete checkpoint
        else:
            if find_damage(tag_dir, state, "size") is None:
                missed.append(offset)
        with open(path, "wb") as fh:
            fh.write(original)
    assert missed == [], [original[i:i + 1] for i in missed]


def test_an_edited_state_file_is_named(tmp_path):
    tag_dir = save_like_two_ranks(str(tmp_path), 2)
    path = os.path.join(tag_dir, STATE_FILE)
    state = json.load(open(path))
    state["sampler"]["position"] = 16  # valid JSON, plausible value, wrong
    write_atomic(path, json.dumps(state))
    assert find_damage(tag_dir, read_state(tag_dir), "size") == (
        f"{path} was changed after it was written (its content no longer matches the hash it was sealed with)")
    assert find_damage(tag_dir, read_state(tag_dir), "off") is None


def test_auto_resume_skips_the_damaged_latest_and_names_the_file(tmp_path):
    root = str(tmp_path)
    save_like_two_ranks(root, 2)
    latest = save_like_two_ranks(root, 4)
    before = {rel: open(os.path.join(latest, rel), "rb").read() for rel in file_manifest(latest)}
    flip(os.path.join(latest, OPTIM))
    warnings = []
    assert find_resume("auto", root, warnings.append).tag == "step-2"
    assert any(f"{latest} is damaged, skipped: {os.path.join(latest, OPTIM)} has other content" in w for w in warnings)
    assert find_resume("auto", root, warnings.append, verify="size").tag == "step-4"
    # Verifying reads only: the damaged checkpoint is left exactly as it was found.
    after = {rel: open(os.path.join(latest, rel), "rb").read() for rel in file_manifest(latest)}
    assert [rel for rel in before if before[rel] != after[rel]] == [OPTIM]
    with pytest.raises(CheckpointError, match=f"{latest} is damaged: .*{OPTIM} has other content.*newest intact one "
                                              f"beside it is {os.path.join(root, 'step-2')}"):
        find_resume(latest, "unused")


def test_checkpoints_from_before_the_hashes_are_checked_by_size(tmp_path):
    tag_dir = save_like_two_ranks(str(tmp_path), 2)
    state = read_state(tag_dir)
    old = {k: v for k, v in state.items() if k not in ("hash", "hashes", "state_hash")}
    flip(os.path.join(tag_dir, MODEL))
    assert find_damage(tag_dir, old, "hash") is None
    os.truncate(os.path.join(tag_dir, MODEL), 10)
    assert "is 10 bytes, but 3000 were written" in find_damage(tag_dir, old, "hash")


def test_file_hash_reads_files_larger_than_its_block(tmp_path):
    import xxhash

    path = tmp_path / "big"
    data = os.urandom((16 << 20) + 12345)
    path.write_bytes(data)
    assert file_hash(path) == xxhash.xxh3_128(data).hexdigest()
