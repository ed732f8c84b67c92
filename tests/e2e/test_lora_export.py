"""dft-convert and dft-eval on real LoRA checkpoints (model.lora=true): 2-rank runs of the real trainer.

Two runs, built once: the embedded default under ZeRO-3 (untied head, adapters only), and a tiny
Llama with tied embeddings under ZeRO-2 with model.lora_train_embeddings and export.hf. The
reference for the merged model is peft itself: PeftModel.from_pretrained on the base with the
--adapter-only output, unmerged.
"""

import json
import os
import shutil

import pytest
import torch

from dft_ds import convert, synthetic
from dft_ds.checkpoint import write_state
from dft_ds.errors import EXIT_BAD_INPUT
from tests.e2e.test_convert import load, logits, probe, run_cli, train
from tests.e2e.test_eval import dft_eval

pytestmark = pytest.mark.slow
LORA = ["model.lora=true", "train.lr=5e-2"]  # a large step: the adapter must move the logits in 2 steps


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"plain": run dir, "embeddings": run dir}."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = tmp_path_factory.mktemp("lora")
    train(tmp, tmp / "plain", *LORA)
    tok = AutoTokenizer.from_pretrained(synthetic.ensure_assets())
    torch.manual_seed(3)
    tied = AutoModelForCausalLM.from_config(synthetic.tiny_model_config(len(tok), num_hidden_layers=2,
                                                                        tie_word_embeddings=True))
    tied.save_pretrained(tmp / "tied-init")
    tok.save_pretrained(tmp / "tied-init")
    train(tmp, tmp / "embeddings", *LORA, f"model.name_or_path={tmp / 'tied-init'}", "model.lora_train_embeddings=true",
          "deepspeed.config=zero2", "export.hf=true")
    return {"plain": tmp / "plain", "embeddings": tmp / "embeddings", "tmp": tmp}


@pytest.fixture(scope="module")
def exported(runs):
    """{(run, kind): dir} with kind "merged" or "adapter", written by the CLI."""
    out = {}
    for name in ("plain", "embeddings"):
        for kind in ("merged", "adapter"):
            target = runs["tmp"] / f"{name}-{kind}"
            proc = run_cli(runs[name], target, *(["--adapter-only"] if kind == "adapter" else []), "--verify",
                           tmp_path=runs["tmp"])
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert f"wrote {target}" in proc.stdout and "verify: max |logit diff|" in proc.stdout
            out[(name, kind)] = target
    return out


def state(run_dir) -> dict:
    checkpoints = run_dir / "checkpoints"
    tag = (checkpoints / "latest").read_text().strip()
    return json.loads((checkpoints / tag / "dft_state.json").read_text())


def peft_logits(adapter_dir, ids, base=None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(base or config["base_model_name_or_path"], dtype=torch.float32)
    return logits(PeftModel.from_pretrained(model, str(adapter_dir)).eval(), ids)


@pytest.mark.parametrize("name", ["plain", "embeddings"])
def test_merged_equals_base_plus_adapter_through_peft_and_moved(runs, exported, name):
    merged, adapter = exported[(name, "merged")], exported[(name, "adapter")]
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(merged))
    ids = probe(merged)
    got = logits(load(merged), ids)  # transformers loads the merged directory as any model
    expected = peft_logits(adapter, ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    base = logits(load(state(runs[name])["lora"]["base"]), ids)
    assert (got - base).abs().max() > 1e-2  # training moved the model: the adapter is not a no-op


def test_adapter_only_is_a_peft_directory_naming_its_base(runs, exported):
    adapter = exported[("plain", "adapter")]
    assert sorted(os.listdir(adapter)) == ["adapter_config.json", "adapter_model.safetensors", "chat_template.jinja",
                                           "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    lora = state(runs["plain"])["lora"]
    assert config["base_model_name_or_path"] == lora["base"] == str(runs["plain"] / "base")
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (
        lora["rank"], lora["alpha"], sorted(lora["targets"]))
    assert config["peft_type"] == "LORA" and not config["modules_to_save"]
    from safetensors import safe_open

    with safe_open(adapter / "adapter_model.safetensors", "pt") as fh:
        names = list(fh.keys())
        assert sum(fh.get_slice(n).get_shape()[0] * fh.get_slice(n).get_shape()[1] for n in names) == \
            lora["trainable_parameters"]
    assert all(".lora_A.weight" in n or ".lora_B.weight" in n for n in names)


def test_trained_embeddings_go_in_as_modules_to_save_and_stay_tied(runs, exported):
    adapter = exported[("embeddings", "adapter")]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(config["modules_to_save"]) == ["embed_tokens", "lm_head"] and config["ensure_weight_tying"]
    ids = probe(adapter)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]),
                                      str(adapter)).merge_and_unload()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still one (trained) matrix
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    assert (model.model.embed_tokens.weight - base.model.embed_tokens.weight).abs().max() > 1e-3
    torch.testing.assert_close(logits(model, ids), logits(load(exported[("embeddings", "merged")]), ids),
                               rtol=0, atol=1e-4)


def test_export_hf_at_the_end_of_training_writes_the_merged_model(runs, exported):
    hf = runs["embeddings"] / "hf"
    ids = probe(hf)
    # What dft-convert writes from the final checkpoint, to the bit (the same code at the end of training)...
    torch.testing.assert_close(logits(load(hf), ids), logits(load(exported[("embeddings", "merged")]), ids),
                               rtol=0, atol=0)
    # ...and what peft itself merges from the exported adapter on its base (a merge wrong in both would
    # pass the first check alone).
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = exported[("embeddings", "adapter")]
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter)).merge_and_unload()
    torch.testing.assert_close(logits(load(hf), ids), logits(merged, ids), rtol=0, atol=1e-4)


def test_adapter_only_on_a_full_checkpoint_exits_2(runs, tmp_path):
    full = tmp_path / "full"
    tag = (runs["plain"] / "checkpoints" / "latest").read_text().strip()
    shutil.copytree(runs["plain"] / "checkpoints" / tag, full)
    content = json.loads((full / "dft_state.json").read_text())
    del content["lora"]  # what a run without model.lora records
    write_state(full, content)  # sealed again: an edit is otherwise damage
    proc = run_cli(full, tmp_path / "out", "--adapter-only", tmp_path=tmp_path)
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-2000:]
    assert "--adapter-only" in proc.stderr and "not a LoRA checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_a_missing_base_exits_2_naming_it_and_the_fix(runs, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(runs["plain"] / "checkpoints", moved)
    tag = (moved / "latest").read_text().strip()
    content = json.loads((moved / tag / "dft_state.json").read_text())
    gone = str(tmp_path / "gone" / "base")
    content["lora"]["base"] = gone
    write_state(moved / tag, content)
    for extra in ([], ["--adapter-only"]):
        proc = run_cli(moved, tmp_path / "out", *extra, tmp_path=tmp_path)
        assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-2000:]
        assert gone in proc.stderr and "does not exist" in proc.stderr and "--base DIR" in proc.stderr
        assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
    # --base names the copy: the same merged model as from the recorded base.
    assert convert.main([str(moved), str(tmp_path / "out"), "--base", str(runs["plain"] / "base"),
                         "--no-progress"]) == 0
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == \
        (runs["tmp"] / "plain-merged" / "model.safetensors").read_bytes()


def test_an_existing_out_dir_is_never_overwritten(runs, exported, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = run_cli(runs["plain"], out, "--adapter-only", tmp_path=tmp_path)
    assert proc.returncode == EXIT_BAD_INPUT and "not empty" in proc.stderr
    assert os.listdir(out) == ["keep.txt"]


EVAL = ["--benchmark", "synthetic", "--limit", "3", "--samples", "1", "--temperature", "0", "--max-new-tokens", "16",
        "--prompt", "chat", "--no-progress"]


def generations(out) -> list[tuple]:
    rows = [json.loads(line) for line in open(out / "samples.jsonl", encoding="utf-8")]
    return [(r["index"], g["text"], g["tokens"]) for r in rows for g in r["generations"]]


def test_dft_eval_on_adapter_and_base_equals_the_merged_model(runs, exported, tmp_path):
    from tests.distributed.helpers import clean_env

    env = {**clean_env(tmp_path), "OMP_NUM_THREADS": "1"}
    adapter, merged = exported[("plain", "adapter")], exported[("plain", "merged")]
    base = runs["plain"] / "base"
    for name, args in (("merged", ["--model", merged]), ("adapter", ["--model", adapter]),
                       ("adapter-base", ["--model", adapter, "--base", base]), ("base", ["--model", base])):
        proc = dft_eval(env, *args, *EVAL, "--out", tmp_path / name)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert generations(tmp_path / "adapter") == generations(tmp_path / "merged")
    assert generations(tmp_path / "adapter-base") == generations(tmp_path / "merged")
    assert generations(tmp_path / "base") != generations(tmp_path / "merged")  # the adapter changes the answers
    settings = json.loads((tmp_path / "adapter" / "results.json").read_text())["settings"]
    assert settings["base"] == str(base) and settings["model"] == str(adapter)
    proc = dft_eval(env, "--model", merged, "--base", base, *EVAL, "--out", tmp_path / "never")
    assert proc.returncode == EXIT_BAD_INPUT and "only for an adapter --model" in proc.stderr
    proc = dft_eval(env, "--model", adapter, "--base", tmp_path / "nowhere", *EVAL, "--out", tmp_path / "never")
    assert proc.returncode == EXIT_BAD_INPUT and str(tmp_path / "nowhere") in proc.stderr
    assert not (tmp_path / "never").exists()
