"""The fused head + loss inside real 2-rank DeepSpeed training equals the full-logits path.

One optimizer step of the real trainer (tests/distributed/grad_probe.py) with loss.fused=true and
=false must give the same loss and the same full gradient of every parameter, head included:
- ZeRO-3, DFT, a model with TIED input/output embeddings, packing and gradient checkpointing
  (the head weight is a partitioned parameter used by two modules);
- ZeRO-3, asft, resumed after 2 steps so that the policy has moved away from its frozen ZeRO-3
  reference engine (whose head is gathered for the fused call) and the KL term is not zero;
- ZeRO-2, mix half-way through its schedule;
- ZeRO-3, eaft (top-5 entropy, alpha 0.5) on packed rows.
All eight steps run in one 2-rank launch (grad_probe.py --many). Then a few steps of the embedded
default run both ways log the same losses.
"""

import sys

import pytest
import torch

from tests.distributed.helpers import QUICK, clean_env, free_port, fused_and_full, read_metrics, run

pytestmark = pytest.mark.slow

BASE = ["data.synthetic_size=64", "data.max_length=128", "train.micro_batch_size=2", "train.global_batch_size=8",
        "train.max_grad_norm=0", "logging.tensorboard=false", "loss.prob_floor=0"]


def tied_model_dir(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dft_ds import synthetic

    tok = AutoTokenizer.from_pretrained(synthetic.ensure_assets())
    torch.manual_seed(3)
    config = synthetic.tiny_model_config(len(tok), num_hidden_layers=2)
    config.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_config(config)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    path = tmp_path / "tied"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


CASES = {
    "tied-zero3-ckpt": lambda tmp: [f"model.name_or_path={tied_model_dir(tmp)}", "model.gradient_checkpointing=true",
                                    "data.packing=true", "loss.type=dft"],
    "asft-zero3": lambda tmp: ["loss.type=asft", "loss.kl_coef=0.5", "data.packing=false"],
    "mix-zero2": lambda tmp: ["deepspeed.config=zero2", "loss.type=mix", "loss.mix_start=0", "loss.mix_end=2"],
    # eaft's weight comes from each chunk's logits on the fused path, from the full logits on the other.
    "eaft-zero3": lambda tmp: ["loss.type=eaft", "loss.eaft_top_k=5", "loss.alpha=0.5", "data.packing=true"],
}


@pytest.fixture(scope="module")
def steps(tmp_path_factory) -> dict:
    """{(case, "fused" or "full"): probe result}: every case both ways, in one 2-rank launch."""
    tmp = tmp_path_factory.mktemp("fused")
    cases = {}
    for case, make in CASES.items():
        overrides = make(tmp)
        run_dir = tmp / "unused"
        if case.startswith("asft"):
            # At step 0 the policy IS the reference and the KL term vanishes; train 2 steps, then probe
            # the resumed step 3, where it does not.
            run_dir = tmp / "moved"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
                   "-m", "dft_ds.train", f"train.output_dir={run_dir}", *BASE, *overrides, "train.max_steps=2",
                   "train.lr=1e-2", "train.warmup_ratio=0", "logging.progress_bar=false"]
            proc = run(cmd, clean_env(tmp), timeout=300)
            assert proc.returncode == 0, proc.stderr[-4000:]
            assert read_metrics(run_dir)[-1]["kl_ref"] > 1e-4
            overrides = overrides + ["train.max_steps=4", "train.lr=1e-2", "train.warmup_ratio=0"]
        cases[case] = [f"train.output_dir={run_dir}", *BASE, *overrides]
    return fused_and_full(tmp, 2, cases)


@pytest.mark.parametrize("case", list(CASES))
def test_fused_step_equals_full_logits_step(steps, case):
    fused, full = steps[case, "fused"], steps[case, "full"]
    assert fused["fused"] is True and full["fused"] is False
    assert fused["targets"] == full["targets"] > 0
    assert fused["loss"] == pytest.approx(full["loss"], rel=1e-6)
    assert fused["kl"] == pytest.approx(full["kl"], rel=1e-5, abs=1e-9)
    if case.startswith("asft"):
        assert full["kl"] > 1e-4
    assert set(fused["grads"]) == set(full["grads"])
    norm = torch.sqrt(sum((g ** 2).sum() for g in full["grads"].values()))
    assert norm > 1e-3
    for name, grad in full["grads"].items():
        torch.testing.assert_close(fused["grads"][name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_the_cases_are_different_steps(steps):
    """One launch, separate runs: each case's step is its own (its loss differs from every other's)."""
    losses = [steps[case, "full"]["loss"] for case in CASES]
    assert len({round(x, 9) for x in losses}) == len(CASES), losses


def test_default_run_logs_the_same_losses_fused_and_not(tmp_path):
    logs = {}
    for fused in ("true", "false"):
        out = tmp_path / f"run-{fused}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
               "-m", "dft_ds.train", f"train.output_dir={out}", *QUICK, "train.max_steps=5", f"loss.fused={fused}",
               "logging.hist_every=5", "checkpoint.save_final=false"]
        proc = run(cmd, clean_env(tmp_path), timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert ("fused head" if fused == "true" else "full logits") in proc.stdout
        logs[fused] = read_metrics(out)
    for a, b in zip(logs["true"], logs["false"], strict=True):
        for key in ("loss", "nll", "mean_token_prob", "grad_norm", "mean_weight"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)
        assert a["target_tokens"] == b["target_tokens"]
        assert a["low_prob_share"] == pytest.approx(b["low_prob_share"], abs=1e-3)
    last = logs["true"][-1]
    assert sum(last["prob_hist"]) == last["target_tokens"]
    assert "prob_hist" not in logs["true"][0]
