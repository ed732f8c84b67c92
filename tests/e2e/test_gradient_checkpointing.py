"""Gradient checkpointing recomputes activations; it must not change what is learned."""

import subprocess
import sys

import pytest

from tests.distributed.helpers import QUICK, clean_env, read_metrics

pytestmark = pytest.mark.slow


def test_gradient_checkpointing_gives_the_same_losses(tmp_path):
    runs = {}
    for flag in ("false", "true"):
        out = tmp_path / f"run-{flag}"
        cmd = [sys.executable, "-m", "dft_ds.train"] + QUICK + [
            f"train.output_dir={out}", "train.max_steps=4", f"model.gradient_checkpointing={flag}",
            "checkpoint.save_final=false", "logging.tensorboard=false"]
        proc = subprocess.run(cmd, env=clean_env(tmp_path), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[flag] = read_metrics(out)
    assert [r["step"] for r in runs["true"]] == [r["step"] for r in runs["false"]] == [1, 2, 3, 4]
    for a, b in zip(runs["false"], runs["true"], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["nll"] == pytest.approx(a["nll"], rel=1e-5)
    assert runs["true"][-1]["nll"] != runs["true"][0]["nll"]  # the steps really updated the model


def test_the_model_a_run_builds_saves_fewer_activations_and_recomputes_with_checkpointing():
    """Through model.build_model (what every run calls): with model.gradient_checkpointing=true the
    forward pass keeps far fewer tensors for backward, and the backward pass runs the layers again.
    So the two runs above compare a checkpointed run with a plain one, not two plain ones."""
    import torch

    from dft_ds import model as mdl
    from dft_ds import synthetic
    from dft_ds.config import load_config

    seen = {}
    for flag in (False, True):
        cfg = load_config(None, [f"model.gradient_checkpointing={str(flag).lower()}"])
        model, _ = mdl.build_model(cfg.model, synthetic.tiny_model_config(512),
                                   {"zero_optimization": {"stage": 0}, "train_batch_size": 1}, torch.float32, seed=0)
        model.train()
        saved = [0]

        def pack(t):
            saved[0] += t.numel() * t.element_size()
            return t

        ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        rerun = []
        model.model.layers[1].self_attn.q_proj.register_forward_hook(lambda *_: rerun.append(1))
        loss.backward()
        seen[flag] = (saved[0], len(rerun), float(loss.detach()))
    assert seen[True][0] < seen[False][0] / 4  # measured: about 13x fewer bytes saved
    assert seen[False][1] == 0 and seen[True][1] >= 1  # the layer runs again only when checkpointed
    assert seen[True][2] == pytest.approx(seen[False][2], rel=1e-6)
