"""Each model family (dft_ds.families) in real 2-rank ZeRO-3 training on gloo:
- one optimizer step on the fused head equals the full-logits step: the same loss and the same full
  gradient of every parameter (tied heads: Qwen2, Qwen3, Gemma 2 and 3; untied: Llama-3, Mistral,
  Phi-3; Gemma 2's final-logit softcapping computed inside the fused head);
- the dft-convert output of the step-1 checkpoint, loaded by plain transformers, gives the logits the
  DeepSpeed engine's model gave on the same batch;
- exact resume of a tied family (Qwen2): 2 + 2 steps equal 4 steps bit for bit, and so do the weights.

All families run in one torchrun launch (tests/distributed/family_probe.py, the session fixture
`family_probe` of tests/conftest.py, which the vLLM tier reuses): start-up is paid once.
"""

import os

import pytest
import torch

from dft_ds import families

pytestmark = [pytest.mark.slow, pytest.mark.families]

NAMES = list(families.FAMILIES)


@pytest.mark.parametrize("name", NAMES)
def test_fused_step_equals_full_logits_step(family_probe, name):
    result = torch.load(family_probe / f"{name}.pt")
    fused, full = result["fused"], result["full"]
    assert result["world_size"] == 2 and fused["fused"] is True and full["fused"] is False
    assert "ZeRO-3" in fused["lines"][1] and "fused head" in fused["lines"][1]
    expected = "eager" if name == "gemma2" else "sdpa"  # what model.attn_implementation=auto picks on CPU
    assert f"attention {expected} (packed documents kept apart by a block mask" in fused["lines"][0]
    assert fused["targets"] == full["targets"] > 0
    assert fused["loss"] == pytest.approx(full["loss"], rel=1e-5)
    assert fused["grads"].keys() == full["grads"].keys()
    for key, ref in full["grads"].items():
        assert ref.abs().max() > 0, f"{name}: {key} got no gradient"
        torch.testing.assert_close(fused["grads"][key], ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item(), msg=key)
    tied = families.family(name).tied
    head_names = [k for k in full["grads"] if k.startswith("lm_head")]
    assert (not head_names) == tied, f"{name}: a tied head has no parameter of its own"


@pytest.mark.parametrize("name", NAMES)
def test_converted_model_gives_the_engines_logits(family_probe, converted_family, name):
    from transformers import AutoModelForCausalLM

    saved = torch.load(family_probe / f"{name}.pt")["full"]["extra"]
    model = AutoModelForCausalLM.from_pretrained(converted_family(name), dtype=torch.float32).eval()
    assert type(model).__name__ == families.family(name).architecture
    with torch.no_grad():
        logits = model(input_ids=saved["input_ids"], position_ids=saved["position_ids"], use_cache=False).logits
    torch.testing.assert_close(logits, saved["logits"], rtol=1e-4, atol=1e-4)


def test_tied_family_resumes_exactly(tmp_path, family_dir):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from tests.distributed.test_resume import assert_preempted, losses, train

    extra = [f"model.name_or_path={family_dir('qwen2')}", "model.config_overrides=", "train.max_steps=4", "train.global_batch_size=4",
             "data.synthetic_size=64", "data.max_length=128", "train.lr=1e-3", "train.warmup_ratio=0"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    rc, log = train(tmp_path, straight, 2, *extra)
    assert rc == 0, log[-3000:]
    rc, log = train(tmp_path, resumed, 2, *extra, "train.stop_at_step=2")
    assert_preempted(rc, log)
    rc, log = train(tmp_path, resumed, 2, *extra)
    assert rc == 0 and "at step 2" in log, log[-3000:]
    assert [s for s, *_ in losses(resumed)] == [1, 2, 3, 4]
    assert losses(resumed) == losses(straight)  # bit for bit
    assert losses(straight)[-1][2] < losses(straight)[0][2]  # and it learned something
    a, b = (get_fp32_state_dict_from_zero_checkpoint(os.path.join(d, "checkpoints"), tag="step-4")
            for d in (resumed, straight))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
