"""model.lora in real 2-rank DeepSpeed training (gloo, CPU).

- ZeRO-3 on the fused head: after training, every frozen weight is bit-identical to the base the run
  wrote to output_dir/base/, only the adapters train, and they moved (B leaves its zero init).
- The same (resumed) step on the fused head and on full logits: the same loss and adapter gradients,
  and no gradient anywhere else, the head included; on a pretrained directory with tied
  embeddings and gradient checkpointing, and with the embeddings trained fully.
- Exact resume: 3 + 3 steps log the same losses, bit for bit, as 6 steps, and end on the same
  adapter weights; a resume with another rank or other targets exits 2 and changes nothing.
- ZeRO-2 with asft: the reference is the base (adapters off), so the KL term starts at exactly 0.
"""

import os
import sys

import pytest
import torch

from tests.distributed.helpers import clean_env, free_port, fused_and_full, read_metrics, run
from tests.distributed.test_fused_training import tied_model_dir

pytestmark = pytest.mark.slow

HERE = os.path.dirname(__file__)
BASE = ["data.synthetic_size=64", "data.max_length=128", "train.micro_batch_size=2", "train.global_batch_size=8",
        "train.max_grad_norm=0", "logging.tensorboard=false", "logging.progress_bar=false", "loss.prob_floor=0",
        "model.lora=true", "model.lora_rank=4", "train.lr=1e-2", "train.warmup_ratio=0"]


def torchrun(tmp_path, *args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}", *args]
    return run(cmd, clean_env(tmp_path), timeout=timeout)


def train(tmp_path, out, *overrides, rc=0):
    proc = torchrun(tmp_path, "-m", "dft_ds.train", f"train.output_dir={out}", *BASE, *overrides)
    if rc:  # torchrun exits 1 and reports each rank's own code (75: preempted, checkpoint saved; 2: bad input)
        assert proc.returncode != 0 and f"exitcode  : {rc} " in proc.stderr, proc.stderr[-4000:]
    else:
        assert proc.returncode == rc, proc.stderr[-4000:]
    return proc


def probe(tmp_path, script, name, run_dir, *overrides):
    out = tmp_path / f"{name}.pt"
    proc = torchrun(tmp_path, os.path.join(HERE, script), str(out), f"train.output_dir={run_dir}", *BASE, *overrides)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out)


def base_weights(run_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(run_dir, "base", "model.safetensors"))


def adapter_state(tag_dir) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    root, tag = os.path.split(str(tag_dir))
    return get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)


def test_zero3_fused_frozen_weights_bit_identical_adapters_move(tmp_path):
    run_dir = tmp_path / "run"
    got = probe(tmp_path, "lora_probe.py", "after", run_dir, "train.max_steps=3", "loss.type=dft", "loss.fused=true")
    base = base_weights(run_dir)
    params, trainable = got["params"], set(got["trainable"])
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    layers = {n.split(".lora_")[0] for n in trainable}
    assert len(layers) == 4 * 7  # every linear layer of the 4 decoder layers; the head has none
    frozen = {n: p for n, p in params.items() if n not in trainable}
    assert len(frozen) == len(base)
    for name, value in frozen.items():
        assert torch.equal(value, base[name.replace(".base_layer", "")].double()), name
    moved = [n for n in trainable if ".lora_B." in n and params[n].abs().max() > 0]
    assert len(moved) == len(layers)  # B starts at zero: every adapter trained


FUSED_CASES = {
    # a pretrained directory with tied embeddings, gradient checkpointing on
    "tied-pretrained-ckpt": lambda tmp: [f"model.name_or_path={tied_model_dir(tmp)}",
                                         "model.gradient_checkpointing=true"],
    # embeddings and head trained fully beside the adapters (one tied matrix here too)
    "train-embeddings": lambda tmp: [f"model.name_or_path={tied_model_dir(tmp)}", "model.lora_train_embeddings=true"],
}


@pytest.fixture(scope="module")
def adapter_steps(tmp_path_factory) -> dict:
    """{(case, "fused" or "full"): probe result}: each case trained 2 steps (A and B both nonzero, so
    both have gradients), then its resumed step both ways, the four steps in one launch."""
    tmp = tmp_path_factory.mktemp("lora-fused")
    cases = {}
    for case, make in FUSED_CASES.items():
        overrides = make(tmp)
        run_dir = tmp / f"moved-{case}"
        train(tmp, run_dir, *overrides, "train.max_steps=2")
        cases[case] = [f"train.output_dir={run_dir}", *BASE, *overrides, "train.max_steps=4"]
    return fused_and_full(tmp, 2, cases)


@pytest.mark.parametrize("case", list(FUSED_CASES))
def test_fused_step_equals_full_logits_step_on_adapters(adapter_steps, case):
    fused, full = adapter_steps[case, "fused"], adapter_steps[case, "full"]
    assert fused["fused"] is True and full["fused"] is False
    assert fused["targets"] == full["targets"] > 0
    assert fused["loss"] == pytest.approx(full["loss"], rel=1e-6)
    names = set(full["grads"])
    assert names == set(fused["grads"])
    assert any(".lora_A." in n for n in names) and any(".lora_B." in n for n in names)
    others = {n for n in names if ".lora_" not in n}
    if case == "train-embeddings":
        assert others == {"model.embed_tokens.weight"}  # tied: the head is the same parameter
    else:
        assert not others  # nothing frozen has a gradient, the head neither
    for name, grad in full["grads"].items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(fused["grads"][name], grad, rtol=1e-4, atol=1e-8, msg=name)


def snapshot(root) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            st = os.stat(os.path.join(dirpath, n))
            out[os.path.join(dirpath, n)] = (st.st_size, st.st_mtime_ns)
    return out


def test_exact_resume_and_refused_changes(tmp_path, dft_train):
    whole, split = tmp_path / "whole", tmp_path / "split"
    common = ["train.max_steps=6", "checkpoint.every_steps=3", "model.lora_dropout=0.1"]
    train(tmp_path, whole, *common)
    train(tmp_path, split, *common, "train.stop_at_step=3", rc=75)
    proc = train(tmp_path, split, *common)
    assert "resumed from" in proc.stdout
    a, b = read_metrics(whole), read_metrics(split)
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == y["loss"] and x["nll"] == y["nll"], x["step"]  # bit for bit on CPU
    wa, wb = adapter_state(whole / "checkpoints" / "step-6"), adapter_state(split / "checkpoints" / "step-6")
    assert set(wa) == set(wb) and all(".lora_" in n for n in wa)  # the checkpoint holds the adapters only
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    before = snapshot(split)
    # Through torchrun, then as each rank of a 2-rank start plans it (main in-process, before any rendezvous).
    proc = train(tmp_path, split, *common, "train.max_steps=9", "model.lora_rank=8", rc=2)
    assert "cannot resume" in proc.stderr and "model.lora_rank" in proc.stderr, proc.stderr[-2000:]
    proc = dft_train(f"train.output_dir={split}", *BASE, *common, "train.max_steps=9",
                     "model.lora_targets=q_proj,v_proj", env={"WORLD_SIZE": "2"})
    assert proc.returncode == 2 and "cannot resume" in proc.stderr and "model.lora_targets" in proc.stderr, proc.stderr
    check = dft_train("--check", "--world-size", "1", f"train.output_dir={split}", *BASE, *common)
    assert check.returncode == 2 and "resume on 2 ranks" in check.stderr, check.stderr[-2000:]
    assert snapshot(split) == before


def test_zero2_asft_reference_is_the_base_without_adapters(tmp_path):
    out = tmp_path / "asft"
    proc = train(tmp_path, out, "deepspeed.config=zero2", "loss.type=asft", "loss.kl_coef=0.5", "train.max_steps=3")
    assert "LoRA r=4" in proc.stdout
    metrics = read_metrics(out)
    # B = 0: the policy is its reference, up to float noise between a grad and a no-grad forward
    assert metrics[0]["kl_ref"] < 1e-7
    assert metrics[-1]["kl_ref"] > 100 * max(metrics[0]["kl_ref"], 1e-9)
    ckpt = out / "checkpoints" / "step-3"
    full = os.path.getsize(ckpt / "mp_rank_00_model_states.pt")
    assert full < 1_000_000  # the adapters only: the 3.7M-parameter base is not in the checkpoint
