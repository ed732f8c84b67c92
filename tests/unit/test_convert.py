"""dft-convert without DeepSpeed: a fake checkpoint layout and a fake (lazy) state dict.

The ZeRO reader is the one collaborator faked here (`load_lazy_state_dict`); the real shards are
read in tests/e2e/test_convert.py.
"""

import json
import os
import stat
import weakref

import pytest
import torch
from safetensors import safe_open

from dft_ds import convert
from dft_ds.checkpoint import CheckpointRef, expected_shard_files, open_checkpoint
from dft_ds.convert import (TensorSpec, convert_checkpoint, dedupe_aliases, index_json, materialize, parse_size,
                            plan_conversion)
from dft_ds.errors import EXIT_BAD_INPUT, UserError

MB = 10**6


def tiny_config(tie: bool):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=3, use_cache=False)


class Lazy:
    """Stands in for DeepSpeed's GatheredTensor: shape, dtype, and a fresh tensor on .contiguous()."""

    live: list = []  # weak references to every tensor handed out

    def __init__(self, tensor):
        self.tensor, self.shape, self.dtype = tensor, tensor.shape, tensor.dtype

    def contiguous(self):
        out = self.tensor.clone()
        Lazy.live.append(weakref.ref(out))
        return out

    @classmethod
    def alive(cls) -> int:
        return sum(ref() is not None for ref in cls.live)


def fake_state_dict(model):
    """What lazy zero_to_fp32 returns: one object per tensor, a tied weight under both names."""
    tensors = {name: Lazy(t.detach().clone()) for name, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    return tensors


def make_checkpoint(root, tag="step-2", world=2, stage=3, precision="fp32", tie=False, latest=True):
    """A tag directory with the files the trainer writes (shards empty: the reader is faked)."""
    tag_dir = root / tag
    (tag_dir / "hf_config").mkdir(parents=True)
    for pattern in expected_shard_files(stage, world):
        (tag_dir / pattern.replace("*", "")).write_bytes(b"")
    (tag_dir / "dft_state.json").write_text(json.dumps(
        {"global_step": 2, "world_size": world, "zero_stage": stage, "precision": precision}))
    tiny_config(tie).save_pretrained(tag_dir / "hf_config")
    if latest:
        (root / "latest").write_text(f"{tag}\n")
    return tag_dir


@pytest.fixture
def fake_run(tmp_path, monkeypatch):
    """(checkpoints dir, model) with the ZeRO reader returning the model's weights lazily."""
    from transformers import AutoModelForCausalLM

    def build(tie=False, precision="fp32", drop=(), extra=None):
        root = tmp_path / "run" / "checkpoints"
        make_checkpoint(root, tie=tie, precision=precision)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(tie)).eval()
        tensors = fake_state_dict(model)
        for name in drop:
            del tensors[name]
        tensors.update(extra or {})
        monkeypatch.setattr(convert, "load_lazy_state_dict", lambda ref: tensors)
        return root, model

    Lazy.live.clear()
    return build


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


# --------------------------------------------------------------------------------------------
# Sizes, shards, index


@pytest.mark.parametrize("text,expected", [("2GB", 2 * 10**9), ("500MB", 500 * MB), ("100kb", 100_000),
                                           ("1.5GB", 1_500_000_000), ("123", 123), ("64B", 64), (" 3 MB ", 3 * MB)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["abc", "0", "-1MB", "GB", "1.2.3KB"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


def specs_dict(sizes_mb):
    """name -> meta tensor of `size` MB in fp32 (only shape and dtype are read)."""
    return {f"t{i}": torch.empty(size * MB // 4, dtype=torch.float32, device="meta") for i, size in enumerate(sizes_mb)}


def test_shards_are_filled_in_order_up_to_the_limit():
    plan = plan_conversion(specs_dict([3, 3, 3, 5, 1]), torch.float32, 6 * MB)
    assert plan.filename_to_tensors == {
        "model-00001-of-00003.safetensors": ["t0", "t1"],
        "model-00002-of-00003.safetensors": ["t2"],
        "model-00003-of-00003.safetensors": ["t3", "t4"],
    }
    assert plan.is_sharded and plan.total_size == 15 * MB


def test_a_tensor_larger_than_the_limit_gets_its_own_shard():
    plan = plan_conversion(specs_dict([1, 10, 1]), torch.float32, 4 * MB)
    # Hugging Face's rule (save_pretrained's too): the big one is set aside, the others keep filling.
    assert list(plan.filename_to_tensors.values()) == [["t1"], ["t0", "t2"]]


def test_everything_that_fits_goes_to_one_model_safetensors():
    plan = plan_conversion(specs_dict([1, 2, 3]), torch.float32, 2 * 10**9)
    assert plan.filename_to_tensors == {"model.safetensors": ["t0", "t1", "t2"]} and not plan.is_sharded


def test_the_size_plan_uses_the_output_dtype():
    tensors = specs_dict([4, 4]) | {"step": torch.empty(2, dtype=torch.int64, device="meta")}
    plan = plan_conversion(tensors, torch.bfloat16, 4 * MB)
    assert plan.specs["t0"] == TensorSpec((MB,), torch.bfloat16) and plan.specs["t0"].nbytes == 2 * MB
    assert plan.specs["step"].dtype == torch.int64  # integer buffers keep their dtype
    assert len(plan.filename_to_tensors) == 2  # 2 + 2 MB fit 4 MB; the int buffer tips the first over


def test_index_json_matches_hugging_face_format():
    plan = plan_conversion(specs_dict([3, 3, 1]), torch.bfloat16, 3 * MB)
    index = index_json(plan)
    assert index["metadata"] == {"total_parameters": 7 * MB // 4, "total_size": 7 * MB // 2}
    assert index["weight_map"] == {"t0": "model-00001-of-00002.safetensors", "t1": "model-00001-of-00002.safetensors",
                                   "t2": "model-00002-of-00002.safetensors"}


def test_tied_aliases_are_written_once_under_the_name_the_model_keeps():
    emb = torch.zeros(4, 2)
    tensors = {"model.embed_tokens.weight": emb, "norm": torch.ones(2), "lm_head.weight": emb}
    assert dedupe_aliases(tensors) == (["model.embed_tokens.weight", "norm"],
                                       {"lm_head.weight": "model.embed_tokens.weight"})
    names, dropped = dedupe_aliases(tensors, keep={"lm_head.weight", "norm"})
    assert names == ["norm", "lm_head.weight"] and dropped == {"model.embed_tokens.weight": "lm_head.weight"}


# --------------------------------------------------------------------------------------------
# Casting


def test_materialize_casts_floats_and_keeps_integers():
    assert materialize(Lazy(torch.randn(3)), torch.bfloat16).dtype == torch.bfloat16
    assert materialize(Lazy(torch.randn(3)), torch.float16).dtype == torch.float16
    assert materialize(torch.arange(3), torch.bfloat16).dtype == torch.int64
    value = torch.randn(5)
    assert torch.equal(materialize(value, torch.bfloat16), value.to(torch.bfloat16))


def test_materialize_detaches_views_of_a_larger_buffer():
    flat = torch.randn(10)  # ZeRO-1/2 hand out views into one flat fp32 vector
    out = materialize(flat.narrow(0, 2, 4), torch.float32)
    assert out.untyped_storage().nbytes() == 16 and torch.equal(out, flat[2:6])


# --------------------------------------------------------------------------------------------
# Finding the checkpoint


def test_tag_comes_from_latest(tmp_path):
    make_checkpoint(tmp_path, tag="step-5", latest=False)
    make_checkpoint(tmp_path, tag="step-10")
    ref = open_checkpoint(tmp_path)
    assert (ref.root, ref.tag, ref.path) == (tmp_path, "step-10", tmp_path / "step-10")
    assert open_checkpoint(tmp_path, tag="step-5").tag == "step-5"


def test_a_tag_directory_can_be_given_directly(tmp_path):
    make_checkpoint(tmp_path, tag="step-3")
    ref = open_checkpoint(tmp_path / "step-3")
    assert (ref.root, ref.tag, ref.state["global_step"]) == (tmp_path, "step-3", 2)
    with pytest.raises(UserError, match="is itself the checkpoint 'step-3'"):
        open_checkpoint(tmp_path / "step-3", tag="step-4")


def test_no_latest_and_no_tag_lists_the_complete_checkpoints(tmp_path):
    make_checkpoint(tmp_path, tag="step-10", latest=False)
    make_checkpoint(tmp_path, tag="step-9", latest=False)
    with pytest.raises(UserError) as err:
        open_checkpoint(tmp_path)
    assert f"{tmp_path}: no 'latest' file" in str(err.value) and "step-9, step-10" in str(err.value)


def test_unknown_tag_is_named(tmp_path):
    make_checkpoint(tmp_path, tag="step-2")
    with pytest.raises(UserError, match=r"step-7: no checkpoint with tag 'step-7' \(complete checkpoints here: step-2"):
        open_checkpoint(tmp_path, tag="step-7")


def test_missing_directory(tmp_path):
    with pytest.raises(UserError, match="nowhere: no such checkpoint directory"):
        open_checkpoint(tmp_path / "nowhere")


def test_a_checkpoint_without_its_state_file_is_incomplete(tmp_path):
    tag_dir = make_checkpoint(tmp_path)
    (tag_dir / "dft_state.json").unlink()
    for target in (tmp_path, tag_dir):  # via latest, and named directly
        with pytest.raises(UserError, match=f"{tag_dir}: incomplete checkpoint, no dft_state.json"):
            open_checkpoint(target)


def test_a_missing_shard_file_is_named(tmp_path):
    tag_dir = make_checkpoint(tmp_path, world=2)
    (tag_dir / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(UserError, match=r"missing \*zero_pp_rank_1_mp_rank_00_optim_states.pt .*ZeRO-3 shards of 2"):
        open_checkpoint(tmp_path)


def test_zero2_layout_and_its_missing_model_file(tmp_path):
    tag_dir = make_checkpoint(tmp_path, stage=2, world=2)
    assert open_checkpoint(tmp_path).state["zero_stage"] == 2
    (tag_dir / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(UserError, match="missing mp_rank_00_model_states.pt"):
        open_checkpoint(tmp_path)


def test_optimizer_shards_of_another_world_size_are_refused(tmp_path):
    tag_dir = make_checkpoint(tmp_path, world=1)
    (tag_dir / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"")
    with pytest.raises(UserError, match="holds 2 optimizer shards but dft_state.json says world_size=1"):
        open_checkpoint(tmp_path)


def test_broken_state_file_names_the_line(tmp_path):
    tag_dir = make_checkpoint(tmp_path)
    (tag_dir / "dft_state.json").write_text('{\n"world_size": 2,\n}')
    with pytest.raises(UserError, match=r"dft_state.json:3: not valid JSON"):
        open_checkpoint(tmp_path)
    (tag_dir / "dft_state.json").write_text('{"world_size": 0, "zero_stage": 0}')
    with pytest.raises(UserError, match="'world_size' must be a positive integer.*'zero_stage' must be 1, 2 or 3"):
        open_checkpoint(tmp_path)


def test_missing_hf_config_is_named(tmp_path):
    tag_dir = make_checkpoint(tmp_path)
    (tag_dir / "hf_config" / "config.json").unlink()
    with pytest.raises(UserError, match=r"hf_config/config.json: missing"):
        open_checkpoint(tmp_path)


def test_unknown_precision_needs_an_explicit_dtype(tmp_path):
    make_checkpoint(tmp_path, precision="auto")
    ref = open_checkpoint(tmp_path)
    with pytest.raises(UserError, match="'precision' is 'auto'.*pass --dtype"):
        convert.choose_dtype(None, ref)
    assert convert.choose_dtype("bf16", ref) == torch.bfloat16
    assert convert.choose_dtype(None, CheckpointRef(tmp_path, "x", {"precision": "bf16"})) == torch.bfloat16


# --------------------------------------------------------------------------------------------
# Converting (fake reader)


def test_converted_directory_loads_and_gives_the_same_logits(fake_run, tmp_path):
    from transformers import AutoModelForCausalLM

    root, model = fake_run()
    out = tmp_path / "hf"
    result = convert_checkpoint(root, out, progress=False, log=lambda *_: None)
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "float32"
    assert config["architectures"] == ["LlamaForCausalLM"] and config["use_cache"] is True
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    assert result.plan.total_size == sum(t.numel() * 4 for t in model.state_dict().values())
    mode = stat.S_IMODE(os.stat(out / "model.safetensors").st_mode)
    assert mode & stat.S_IRGRP and mode & stat.S_IROTH  # readable by the group that serves it
    assert not torch.distributed.is_initialized()


def test_tied_embeddings_are_written_once_and_tied_on_load(fake_run, tmp_path):
    from transformers import AutoModelForCausalLM

    root, model = fake_run(tie=True)
    convert_checkpoint(root, tmp_path / "hf", progress=False, log=lambda *_: None)
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as fh:
        names = set(fh.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = torch.arange(8).unsqueeze(0)
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_bf16_output_and_precision_default(fake_run, tmp_path):
    root, model = fake_run(precision="bf16")  # no --dtype: the training precision
    result = convert_checkpoint(root, tmp_path / "hf", progress=False, log=lambda *_: None)
    assert result.dtype == torch.bfloat16
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as fh:
        weight = fh.get_tensor("model.norm.weight")
        assert all(fh.get_tensor(k).dtype == torch.bfloat16 for k in fh.keys())
    assert torch.equal(weight, model.model.norm.weight.detach().to(torch.bfloat16))
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"


def test_only_one_shard_is_held_at_a_time(fake_run, tmp_path):
    root, model = fake_run()
    result = convert_checkpoint(root, tmp_path / "hf", max_shard_size=3000, progress=False, log=lambda *_: None)
    shards = result.plan.filename_to_tensors
    assert len(shards) > 3 and (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    # Every tensor was materialised once; none outlived the shard it was written in.
    assert len(Lazy.live) == len(result.plan.specs) and Lazy.alive() == 0
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict()) and set(index["weight_map"].values()) == set(shards)


def test_peak_live_tensors_is_one_shard(fake_run, tmp_path, monkeypatch):
    root, _ = fake_run()
    peak = []
    real = convert.materialize
    monkeypatch.setattr(convert, "materialize", lambda t, d: (peak.append(Lazy.alive()), real(t, d))[1])
    result = convert_checkpoint(root, tmp_path / "hf", max_shard_size=3000, progress=False, log=lambda *_: None)
    assert max(peak) < max(len(names) for names in result.plan.filename_to_tensors.values())


def test_non_empty_out_dir_is_refused_and_left_alone(fake_run, tmp_path, capsys):
    root, _ = fake_run()
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert convert.main([str(root), str(out), "--no-progress"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"{out}: not empty" in err and "--overwrite" in err
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert [p for p in os.listdir(tmp_path) if p.startswith(".hf")] == []
    assert convert.main([str(root), str(out), "--overwrite", "--no-progress"]) == 0
    assert "keep.txt" not in os.listdir(out) and "model.safetensors" in os.listdir(out)
    assert [p for p in os.listdir(tmp_path) if p.startswith(".hf")] == []


def test_an_empty_out_dir_is_used(fake_run, tmp_path):
    root, _ = fake_run()
    (tmp_path / "hf").mkdir()
    convert_checkpoint(root, tmp_path / "hf", progress=False, log=lambda *_: None)
    assert "model.safetensors" in os.listdir(tmp_path / "hf")


def test_out_dir_must_not_hold_the_checkpoint(fake_run, tmp_path):
    root, _ = fake_run()
    for out in (root.parent, root, root / "step-2", root / "step-2" / "hf"):
        with pytest.raises(UserError, match="must lie outside the checkpoint"):
            convert_checkpoint(root, out, overwrite=True, progress=False, log=lambda *_: None)
    assert (root / "step-2" / "dft_state.json").is_file()


def test_a_failed_conversion_leaves_nothing(fake_run, tmp_path, monkeypatch):
    root, _ = fake_run()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(convert, "write_hf_files", fail)
    with pytest.raises(OSError):
        convert_checkpoint(root, tmp_path / "hf", progress=False, log=lambda *_: None)
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_shards_that_do_not_fit_the_config_are_refused(fake_run, tmp_path):
    root, _ = fake_run(drop=["model.norm.weight"])
    with pytest.raises(UserError, match="missing 1 tensor.*model.norm.weight"):
        convert_checkpoint(root, tmp_path / "hf", progress=False, log=lambda *_: None)
    assert not (tmp_path / "hf").exists()


def test_untied_weights_with_a_tied_config_are_refused(fake_run, tmp_path):
    root, _ = fake_run(tie=True, extra={"lm_head.weight": Lazy(torch.zeros(64, 16))})
    with pytest.raises(UserError, match="lm_head.weight.*trained untied"):
        convert_checkpoint(root, tmp_path / "hf", progress=False, log=lambda *_: None)


def test_verify_passes_for_fp32_and_bf16(fake_run, tmp_path):
    root, _ = fake_run()
    result = convert_checkpoint(root, tmp_path / "a", verify_logits=True, progress=False, log=lambda *_: None)
    assert result.verify.ok and result.verify.max_abs_diff == 0.0
    result = convert_checkpoint(root, tmp_path / "b", dtype="bf16", verify_logits=True, progress=False,
                                log=lambda *_: None)
    report = result.verify
    assert report.ok and report.max_abs_diff <= 1e-5 and 0 < report.cast_abs_diff <= report.cast_tolerance


def test_verify_catches_a_wrong_tensor_and_writes_nothing(fake_run, tmp_path, monkeypatch, capsys):
    root, _ = fake_run()
    real = convert.materialize

    def corrupt(tensor, dtype):
        out = real(tensor, dtype)
        return out * 1.01 if out.ndim == 2 and out.shape[0] == 32 else out  # the MLP up/gate projections

    monkeypatch.setattr(convert, "materialize", corrupt)
    assert convert.main([str(root), str(tmp_path / "hf"), "--verify", "--no-progress"]) == convert.EXIT_VERIFY_FAILED
    assert "was not written" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_cli_rejects_a_bad_size_and_dtype(capsys):
    for argv in (["a", "b", "--max-shard-size", "lots"], ["a", "b", "--dtype", "int8"]):
        with pytest.raises(SystemExit) as exc:
            convert.parse_args(argv)
        assert exc.value.code == 2
    assert "not a size like 2GB" in capsys.readouterr().err


def test_cli_reports_a_missing_checkpoint(tmp_path, capsys):
    assert convert.main([str(tmp_path / "nope"), str(tmp_path / "out")]) == EXIT_BAD_INPUT
    assert capsys.readouterr().err.strip() == f"dft-convert: error: {tmp_path / 'nope'}: no such checkpoint directory"


def test_models_are_built_whole_inside_a_zero3_training_process(fake_run, tmp_path):
    """export.hf converts in the training process, where an HfDeepSpeedConfig may still be alive."""
    from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled

    root, _ = fake_run()
    keepalive = HfDeepSpeedConfig({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})
    assert is_deepspeed_zero3_enabled()
    result = convert_checkpoint(root, tmp_path / "hf", verify_logits=True, progress=False, log=lambda *_: None)
    assert result.verify.ok and is_deepspeed_zero3_enabled()  # restored afterwards
    assert not torch.distributed.is_initialized()
    del keepalive
