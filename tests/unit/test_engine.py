"""Pure parts of the DeepSpeed seam: launcher environments (procgroup), config rendering and precision
(ds_config), the schedule, the arch list (deepspeed_setup), sequence parallelism's masks and kernel,
and the engine's forward over rows laid end to end."""

import json
import os

import pytest
import torch

from dft_ds import deepspeed_setup, ds_config, engine, procgroup, schedule
from dft_ds.sequence_parallel import SequenceGroup, SequenceParallel, document_mask
from dft_ds.batch import BatchSplit
from dft_ds.config import load_config
from dft_ds.errors import ConfigError
from dft_ds.train import parse_args


def test_slurm_variables_become_torch_ranks():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "29500"}
    procgroup.map_launcher_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("5", "8", "1")
    assert env["MASTER_ADDR"] == "n1"


def test_launcher_variables_win_over_slurm():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    procgroup.map_launcher_env(env)
    assert (env["RANK"], env["WORLD_SIZE"]) == ("1", "2")


def test_plain_process_is_a_world_of_one_on_loopback():
    env = {}
    procgroup.map_launcher_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("0", "1", "0", "127.0.0.1")
    assert 0 < int(env["MASTER_PORT"]) < 65536


@pytest.mark.parametrize("env, local", [
    ({"LOCAL_WORLD_SIZE": "4", "WORLD_SIZE": "8", "MASTER_ADDR": "n1"}, 4),                  # torchrun
    ({"LOCAL_SIZE": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "n1"}, 2),                         # deepspeed
    ({"SLURM_PROCID": "5", "SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "3"}, 1),  # srun
    ({"SLURM_PROCID": "1", "SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "1"}, 2),
    ({"SLURM_PROCID": "0", "SLURM_TASKS_PER_NODE": "3"}, 3),
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}, 2),                        # by hand, one machine
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.7"}, None),                      # by hand, unknown
    ({}, None),
])
def test_ranks_on_this_node_from_each_launcher(env, local):
    assert procgroup.ranks_on_this_node(env) == local


def test_cpu_ranks_share_the_cores_unless_omp_num_threads_is_set(monkeypatch):
    monkeypatch.setattr(procgroup.os, "sched_getaffinity", lambda pid: set(range(16)))
    by_hand = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}
    assert procgroup.cpu_threads_per_rank(by_hand) == 8
    assert procgroup.cpu_threads_per_rank({**by_hand, "WORLD_SIZE": "32"}) == 1
    assert procgroup.cpu_threads_per_rank({**by_hand, "OMP_NUM_THREADS": "3"}) is None  # the user's choice
    assert procgroup.cpu_threads_per_rank({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "n1"}) is None


@pytest.mark.parametrize("argv", [["--local_rank=1", "train.lr=0.1"], ["--local-rank", "1", "train.lr=0.1"],
                                  ["train.lr=0.1", "--local_rank=1"]])
def test_deepspeed_launcher_local_rank_is_accepted(argv):
    ns = parse_args(argv)
    assert ns.local_rank == 1 and ns.overrides == ["train.lr=0.1"] and ns.config is None


def test_config_file_then_overrides():
    ns = parse_args(["c.yaml", "a.b=1", "c.d=2"])
    assert ns.config == "c.yaml" and ns.overrides == ["a.b=1", "c.d=2"]


@pytest.mark.parametrize("argv", [["--check", "c.yaml", "--world-size", "8", "a.b=1"],
                                  ["c.yaml", "a.b=1", "--check", "--world-size=8"],
                                  ["--world-size", "8", "c.yaml", "--check", "a.b=1"]])
def test_options_and_overrides_mix_in_any_order(argv):
    ns = parse_args(argv)
    assert ns.check and ns.world_size == 8 and ns.config == "c.yaml" and ns.overrides == ["a.b=1"]


def render(overrides=(), on_cpu=True, precision="fp32", plan=BatchSplit(4, 2, 2), hidden=256):
    return ds_config.render_ds_config(load_config(None, list(overrides)), plan, precision, hidden, on_cpu)


def test_auto_fields_are_filled_from_the_run_config():
    ds = render(["train.lr=0.002", "train.max_grad_norm=0.5", "train.weight_decay=0.1"])
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 0.5
    params = ds["optimizer"]["params"]
    assert params["lr"] == 0.002 and params["weight_decay"] == 0.1 and params["betas"] == [0.9, 0.95]
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["reduce_bucket_size"] == 256 * 256
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert "auto" not in json.dumps(ds)


def test_cpu_uses_torch_adamw_and_gpu_fused():
    assert render(on_cpu=True)["optimizer"]["params"]["torch_adam"] is True
    assert "torch_adam" not in render(on_cpu=False)["optimizer"]["params"]
    offload = render(["deepspeed.config=zero3_offload"], on_cpu=True)
    assert "torch_adam" not in offload["optimizer"]["params"]  # DeepSpeedCPUAdam does the offloaded step
    assert offload["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


@pytest.mark.parametrize("precision,bf16,fp16", [("bf16", True, False), ("fp16", False, True), ("fp32", False, False)])
def test_precision_flags(precision, bf16, fp16):
    ds = render(precision=precision)
    assert ds["bf16"]["enabled"] is bf16 and ds["fp16"]["enabled"] is fp16


def test_every_template_renders():
    for name in ds_config.TEMPLATES:
        ds = render([f"deepspeed.config={name}"])
        assert ds["zero_optimization"]["stage"] == (2 if name == "zero2" else 3)


# LLaMA-Factory's examples/deepspeed/ds_z3_config.json, in its shape: no optimizer, no scheduler.
LLAMA_FACTORY_Z3 = {
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
             "hysteresis": 2, "min_loss_scale": 1},
    "bf16": {"enabled": "auto"},
    "zero_optimization": {"stage": 3, "overlap_comm": False, "contiguous_gradients": True, "sub_group_size": 1e9,
                          "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                          "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e9,
                          "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True}}


@pytest.mark.parametrize("on_cpu", [True, False])
def test_a_json_without_an_optimizer_gets_adamw_from_the_run_config(tmp_path, on_cpu):
    path = tmp_path / "ds_z3_config.json"
    path.write_text(json.dumps(LLAMA_FACTORY_Z3))
    ds = render([f"deepspeed.config={path}", "train.lr=3e-5", "train.weight_decay=0.01"], on_cpu=on_cpu,
                precision="bf16")
    assert ds["optimizer"]["type"] == "AdamW"
    params = ds["optimizer"]["params"]
    assert (params["lr"], params["weight_decay"], params["betas"]) == (3e-5, 0.01, [0.9, 0.95])
    assert params.get("torch_adam") is (True if on_cpu else None)
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False and "auto" not in json.dumps(ds)


def test_a_scheduler_block_is_set_aside_with_a_warning(tmp_path):
    path = tmp_path / "hf.json"
    path.write_text(json.dumps({**LLAMA_FACTORY_Z3, "scheduler": {"type": "WarmupLR", "params": {
        "warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto"}}}))
    said = []
    ds = ds_config.render_ds_config(load_config(None, [f"deepspeed.config={path}", "train.lr=1e-4"]),
                                    BatchSplit(4, 2, 2), "fp32", 256, True, warn=said.append)
    assert "scheduler" not in ds
    assert said == [f"deepspeed.config: the scheduler block of {path} (WarmupLR) is not used; the learning rate "
                    "follows train.lr=0.0001 with train.warmup_ratio=0.05 and cosine decay"]


@pytest.mark.parametrize("block, precision, fix", [
    ({"bf16": {"enabled": True}}, "fp32", "train.precision=bf16"),
    ({"fp16": {"enabled": True}}, "bf16", "train.precision=fp16"),
    ({"bf16": {"enabled": False}}, "bf16", "train.precision=the precision you want"),
])
def test_a_precision_block_that_contradicts_train_precision_is_refused(tmp_path, block, precision, fix):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({**LLAMA_FACTORY_Z3, **block}))
    kind = next(iter(block))
    with pytest.raises(ConfigError) as info:
        render([f"deepspeed.config={path}"], precision=precision)
    assert (f"{path}: '{kind}.enabled' is {str(block[kind]['enabled']).lower()} but train.precision is {precision}; "
            f"set it to \"auto\", or set {fix}") in str(info.value)


def test_unknown_auto_and_unknown_template_are_config_errors(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": "auto", "zero_optimization": {"stage": 3, "sub_group_size": "auto"}}))
    with pytest.raises(ConfigError, match="zero_optimization.sub_group_size"):
        render([f"deepspeed.config={path}"])
    with pytest.raises(ConfigError, match="neither a template"):
        render(["deepspeed.config=zero4"])


def test_cosine_with_warmup():
    total, warmup = 100, 10
    lrs = [schedule.cosine_with_warmup(s, total, warmup, 0.1) for s in range(total)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))  # rising in warmup
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # falling after
    assert schedule.cosine_with_warmup(total, total, warmup, 0.1) == pytest.approx(0.1)
    assert schedule.cosine_with_warmup(55, total, warmup, 0.0) == pytest.approx(0.5)  # half way through cosine


def test_auto_precision_is_fp32_on_cpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("auto picks bf16/fp16 where a GPU exists")
    assert ds_config.resolve_precision("auto") == "fp32"
    assert ds_config.resolve_precision("bf16") == "bf16"


@pytest.mark.parametrize("value, expected", [
    ("9.0a", "9.0"), ("8.0;9.0a", "8.0;9.0"), ("9.0 9.0a 10.0f+PTX", "9.0;10.0+PTX"),
    ("8.0;9.0", None), ("9.0+PTX", None), ("", None)])
def test_arch_list_suffixes_are_dropped_for_deepspeed(value, expected):
    assert deepspeed_setup.arch_list_for_deepspeed({"TORCH_CUDA_ARCH_LIST": value}) == expected


def test_deepspeed_builds_its_ops_from_the_rewritten_arch_list(monkeypatch):
    """DeepSpeed's own parser takes the rewrite of "8.0;9.0a" (the list of an H200 image; DeepSpeed 0.19
    refuses the original with "invalid literal for int()", a later one may not: what is tested is the
    rewrite)."""
    from deepspeed.ops.op_builder.fused_adam import FusedAdamBuilder

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", deepspeed_setup.arch_list_for_deepspeed())
    assert FusedAdamBuilder().compute_capability_args() == ["-gencode=arch=compute_80,code=sm_80",
                                                            "-gencode=arch=compute_90,code=sm_90"]


def test_document_mask_is_causal_within_documents_only():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    mask = document_mask(pos)[0, 0]
    want = torch.zeros(6, 6, dtype=torch.bool)
    for q in range(6):
        for k in range(q + 1):
            want[q, k] = (q < 3) == (k < 3) and (q < 5) == (k < 5)
    assert torch.equal(mask, want)


def test_sequence_parallel_attention_is_the_plain_kernel_outside_a_training_block():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    before, mask_before = ALL_ATTENTION_FUNCTIONS["sdpa"], ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    try:
        sp = SequenceParallel(SequenceGroup(2, 0, 0))
        sp.install("sdpa")
        wrapped = ALL_ATTENTION_FUNCTIONS["sdpa"]
        other = SequenceParallel(SequenceGroup(2, 0, 0))
        other.install("sdpa")  # a second engine in the process takes the kernel over: not a second wrapping
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is wrapped and wrapped is not before and wrapped.sequence is other
        q = torch.randn(1, 2, 5, 8)

        class Module(torch.nn.Module):
            is_causal, num_key_value_groups = True, 1

        got, _ = wrapped(Module(), q, q, q, None, position_ids=torch.arange(5)[None])
        want, _ = before(Module(), q, q, q, None, position_ids=torch.arange(5)[None])
        assert torch.equal(got, want)
        # The model's own mask: built outside the block; inside it the exchange masks each document.
        packed = lambda b, h, q_idx, kv_idx: kv_idx <= q_idx  # noqa: E731
        args = dict(batch_size=1, q_length=4, kv_length=4, mask_function=packed, allow_is_causal_skip=False)
        outside = ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](**args)
        assert torch.equal(outside, mask_before(**args)) and outside.shape[-1] == 4
        with other.running():
            assert ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](**args) is None
        with sp.running():  # not the kernel's object now
            assert ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](**args) is not None
    finally:
        ALL_ATTENTION_FUNCTIONS["sdpa"], ALL_MASK_ATTENTION_FUNCTIONS["sdpa"] = before, mask_before


def test_document_mask_with_a_sliding_window():
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1]])
    mask = document_mask(pos, window=2)[0, 0]
    for q in range(7):
        for k in range(7):
            same_doc = (q < 5) == (k < 5)
            assert bool(mask[q, k]) == (same_doc and 0 <= q - k < 2), (q, k)


def _llama_on(attention: str):
    from transformers import AutoModelForCausalLM

    from dft_ds import synthetic

    torch.manual_seed(0)
    config = synthetic.tiny_model_config(64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=2, intermediate_size=48)
    config._attn_implementation = attention
    return AutoModelForCausalLM.from_config(config).eval()


class _Wrapped:
    """What _forward needs of a DeepSpeed engine: `module`, and calling it runs the model."""

    def __init__(self, model):
        self.module = model

    def __call__(self, **kwargs):
        return self.module(**kwargs)


def test_flash_attention_micro_batches_run_as_one_row_end_to_end():
    assert engine.rows_end_to_end("flash_attention_2", 2)
    assert not engine.rows_end_to_end("flash_attention_2", 1)
    assert not engine.rows_end_to_end("sdpa", 4)
    assert not engine.rows_end_to_end("flash_attention_2", 2, sequence_parallel=True)  # the exchange does it


def test_rows_laid_end_to_end_give_each_row_and_document_its_own_outputs(monkeypatch):
    """Two packed rows (documents of 3 + 2 + padding 1, and 4 + 2), laid end to end as flash-attention
    runs them: the logits come back per row, equal to the rows run as a batch, and each document's
    equal to the document run alone; the fused head views the hidden states (its own and a
    reference's) back to the rows and gives the loss and gradient of the rows run as a batch."""
    from dft_ds.loss import FusedHead, HiddenStatesHead, Reference, token_weight
    from dft_ds.model import accept_head

    model = _llama_on("sdpa")
    accept_head(model)
    ids = torch.randint(4, 64, (2, 6))
    labels = torch.randint(4, 64, (2, 6))
    labels[0, -1] = -100
    batch = {"input_ids": ids, "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])}
    wrapped, cpu = _Wrapped(model), torch.device("cpu")
    with torch.no_grad():
        want = engine._forward(wrapped, cpu, batch).logits
        want_hidden = engine._forward(wrapped, cpu, batch, head=HiddenStatesHead())
    results = []
    for end_to_end in (False, True):
        monkeypatch.setattr(engine, "rows_end_to_end", lambda attention, rows, sp, _e=end_to_end: _e)
        with torch.no_grad():
            got = engine._forward(wrapped, cpu, batch).logits
            ref = Reference(engine._forward(wrapped, cpu, batch, head=HiddenStatesHead()), _SameHead(), 0.5)
        model.zero_grad()
        parts = engine._forward(wrapped, cpu, batch, head=FusedHead(labels, token_weight("dft"), reference=ref))
        parts.loss.backward()
        results.append((got, ref.hidden.numel(), parts.loss.detach(), model.get_output_embeddings().weight.grad.clone()))
        with torch.no_grad():
            alone = model(input_ids=ids[1:, 4:]).logits
    (logits, n, loss, grad), (flat_logits, flat_n, flat_loss, flat_grad) = results
    assert flat_logits.shape == want.shape == (2, 6, 64) and want_hidden.shape == (2, 6, 32) and flat_n == n
    torch.testing.assert_close(flat_logits, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flat_logits[1:, 4:], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(want_hidden @ model.get_output_embeddings().weight.T, want, atol=1e-5, rtol=1e-5)
    assert loss > 0
    torch.testing.assert_close(flat_loss, loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(flat_grad, grad, atol=1e-6, rtol=1e-5)


class _SameHead:
    """A reference whose head is the policy's (as engine.AdapterOffReference)."""

    @staticmethod
    def head_weight(policy_weight):
        import contextlib

        return contextlib.nullcontext(policy_weight)


def test_exit_rank_without_a_process_group_is_an_ordinary_exit(monkeypatch):
    """Only a program that joined a process group skips the interpreter's teardown
    (tests/distributed/test_exit.py runs the other case in real ranks)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        pytest.skip("this pytest process holds a process group")  # exit_rank would end it
    monkeypatch.setattr(procgroup, "_JOINED_PROCESS_GROUP", False)
    with pytest.raises(SystemExit) as exc:
        procgroup.exit_rank(3)
    assert exc.value.code == 3


def test_the_shm_buffer_is_named_only_where_deepspeed_makes_one():
    from dft_ds.procgroup import shm_buffer_path

    env = {"LOCAL_SIZE": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}
    assert shm_buffer_path(1, env) == f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_29511_1"
    # ranks on several machines (LOCAL_SIZE below the world size) and srun (no LOCAL_SIZE): no file
    assert shm_buffer_path(1, {**env, "WORLD_SIZE": "4"}) is None
    assert shm_buffer_path(0, {"WORLD_SIZE": "2", "MASTER_PORT": "29511"}) is None


def test_the_rank_variables_land_in_os_environ_after_datasets_replaced_it():
    """datasets' multi-process map sets `os.environ = <a copy>`: a function whose default argument was
    the old object wrote RANK/WORLD_SIZE where nothing reads them (KeyError: 'WORLD_SIZE' in dft-train run
    in-process after a tokenisation with two workers). In a process of its own: the test changes os.environ."""
    import subprocess
    import sys

    script = """
import os, datasets
import dft_ds.procgroup  # imported before the map, as a run imports it
from dft_ds.train import world_size_from_env
before = os.environ
datasets.Dataset.from_dict({"x": list(range(8))}).map(lambda row: row, num_proc=2)
assert os.environ is not before, "datasets no longer replaces os.environ: nothing to check"
assert world_size_from_env() == 1 and os.environ["RANK"] == "0"
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID")}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
