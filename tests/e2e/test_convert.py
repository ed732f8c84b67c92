"""dft-convert on real checkpoints: 2-rank ZeRO-3 runs of the real trainer -> a Hugging Face directory.

The reference for every comparison is DeepSpeed's own (non-lazy) reconstruction of the fp32
weights, loaded into a fresh model built from the checkpoint's config. Two runs: the embedded
default (untied head) and a tiny Llama with tied embeddings started from a pretrained directory
(DeepSpeed then records lm_head.weight as a shared parameter).
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from dft_ds import convert, synthetic
from dft_ds.errors import EXIT_BAD_INPUT
from tests.distributed.helpers import QUICK, clean_env, free_port

pytestmark = pytest.mark.slow
STEPS = 2


def train(tmp_path, out, *extra) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           "-m", "dft_ds.train"] + QUICK + [
        f"train.output_dir={out}", f"train.max_steps={STEPS}", f"checkpoint.every_steps={STEPS}",
        "logging.tensorboard=false", "train.lr=1e-3"] + list(extra)
    log = tmp_path / f"{out.name}.log"
    with open(log, "w") as fh:  # a file, not a pipe: an unread pipe can block a rank mid-collective
        rc = subprocess.run(cmd, env=clean_env(tmp_path), stdout=fh, stderr=subprocess.STDOUT, timeout=300).returncode
    assert rc == 0, log.read_text()[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"untied": checkpoints dir, "tied": checkpoints dir}, each a 2-rank ZeRO-3 run of 2 steps."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = tmp_path_factory.mktemp("convert")
    train(tmp, tmp / "untied", f"data.cache_dir={tmp / 'data-cache'}")
    tok = AutoTokenizer.from_pretrained(synthetic.ensure_assets())
    torch.manual_seed(3)
    tied = AutoModelForCausalLM.from_config(synthetic.tiny_model_config(
        len(tok), num_hidden_layers=2, tie_word_embeddings=True))
    tied.save_pretrained(tmp / "tied-init")
    tok.save_pretrained(tmp / "tied-init")
    train(tmp, tmp / "tied", f"model.name_or_path={tmp / 'tied-init'}")
    return {name: tmp / name / "checkpoints" for name in ("untied", "tied")}


def test_one_rank_of_two_tokenised_the_data_and_the_other_read_it(runs):
    """The first run's two ranks shared a data cache of their own: one process tokenised (under the lock),
    the other read the set it wrote; both trained on it."""
    import json

    tmp = runs["untied"].parent.parent
    log = (tmp / "untied.log").read_text()
    assert log.count("data: tokenising") == 1 and log.count("data: wrote the tokenised set") == 1, log[-3000:]
    (folder,) = [p for p in (tmp / "data-cache").iterdir() if p.is_dir()]
    prepared_by = json.loads((folder / "manifest.json").read_text())["prepared_by"]["rank"]
    assert prepared_by in ("0", "1")
    # Rank 0 reports its read when it was not the one that tokenised (rank 1 reads quietly).
    assert ("data: read the tokenised set" in log) == (prepared_by == "1")


def reference_model(checkpoints):
    """A fresh model holding DeepSpeed's own reconstruction of the checkpoint's fp32 weights."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM

    tag = (checkpoints / "latest").read_text().strip()
    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoints), tag=tag)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoints / tag / "hf_config"),
                                             dtype=torch.float32)
    model.load_state_dict(state, strict=True)
    return model.eval()


def probe(out_dir) -> torch.Tensor:
    """Token ids of fixed text, from the converted directory's own tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out_dir)
    texts = ["Calculate 3 + 4 * 2.", "Tom has 5 boxes of 6 pens. How many pens does he have?"]
    return tok(texts, padding=True, return_tensors="pt")["input_ids"]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def load(out_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()


def run_cli(*args, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dft_ds.convert", *map(str, args), "--no-progress"],
                          env=clean_env(tmp_path), capture_output=True, text=True, timeout=300)


def safetensors_names(out_dir) -> dict[str, torch.dtype]:
    found = {}
    for name in sorted(os.listdir(out_dir)):
        if name.endswith(".safetensors"):
            with safe_open(out_dir / name, "pt") as fh:
                found.update({key: fh.get_slice(key).get_dtype() for key in fh.keys()})
    return found


@pytest.mark.parametrize("kind", ["untied", "tied"])
def test_cli_output_loads_and_matches_deepspeeds_reconstruction(runs, kind, tmp_path):
    out = tmp_path / "hf"
    proc = run_cli(runs[kind], out, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {out}" in proc.stdout
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= set(os.listdir(out))
    ids = probe(out)  # the tokenizer loads from the converted directory
    expected = logits(reference_model(runs[kind]), ids)
    torch.testing.assert_close(logits(load(out), ids), expected, rtol=0, atol=1e-5)
    names = safetensors_names(out)
    assert set(names.values()) == {"F32"}
    assert ("lm_head.weight" in names) == (kind == "untied")  # a tied head is written once


def test_small_shards_give_an_index_that_loads(runs, tmp_path):
    out = tmp_path / "hf"
    assert convert.main([str(runs["untied"]), str(out), "--max-shard-size", "1MB", "--no-progress"]) == 0
    shards = sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))
    assert len(shards) >= 5 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(os.path.getsize(out / s) for s in shards) - sum(
        _header_bytes(out / s) for s in shards)
    ids = probe(out)
    torch.testing.assert_close(logits(load(out), ids), logits(reference_model(runs["untied"]), ids), rtol=0, atol=1e-5)
    assert not torch.distributed.is_initialized()  # converting in this process joined no process group


def _header_bytes(path) -> int:
    """safetensors file = 8-byte header length + JSON header + data."""
    with open(path, "rb") as fh:
        return 8 + int.from_bytes(fh.read(8), "little")


def test_bf16_output_and_verify(runs, tmp_path, capsys):
    out = tmp_path / "hf"
    assert convert.main([str(runs["tied"]), str(out), "--dtype", "bf16", "--verify", "--no-progress"]) == 0
    assert "verify: max |logit diff| 0" in capsys.readouterr().out
    assert set(safetensors_names(out).values()) == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_verify_passes_on_the_cli(runs, tmp_path):
    proc = run_cli(runs["untied"], tmp_path / "hf", "--verify", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "verify: max |logit diff|" in proc.stdout


def test_non_empty_out_dir_is_refused_untouched(runs, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    proc = run_cli(runs["untied"], out, tmp_path=tmp_path)
    assert proc.returncode == EXIT_BAD_INPUT
    assert f"{out}: not empty" in proc.stderr and "Traceback" not in proc.stderr
    assert os.listdir(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    assert [name for name in os.listdir(tmp_path) if name.startswith(".hf")] == []  # no staging left behind


def test_a_run_directory_converts_its_latest_checkpoint_and_says_which(runs, tmp_path, capsys):
    # `dft-convert RUN_DIR OUT` used to fail with "RUN_DIR: no 'latest' file": it lives in RUN_DIR/checkpoints.
    checkpoints = runs["untied"]
    run_dir = checkpoints.parent
    tag = (checkpoints / "latest").read_text().strip()
    out = tmp_path / "hf"
    proc = run_cli(run_dir, out, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (f"dft-convert: {run_dir} is a run directory: converting {checkpoints / tag} (the latest, named in "
            f"{checkpoints / 'latest'})") in proc.stdout
    assert f"wrote {out}" in proc.stdout
    ids = probe(out)
    model = load(out)
    torch.testing.assert_close(logits(model, ids), logits(reference_model(checkpoints), ids), rtol=0, atol=1e-5)

    # --tag is looked up in RUN_DIR/checkpoints too
    assert convert.main([str(run_dir), str(tmp_path / "tagged"), "--tag", tag, "--no-progress"]) == 0
    assert f"converting {checkpoints / tag} (--tag {tag})" in capsys.readouterr().out

    # dft-plan counts the parameters of what dft-convert wrote (once reported as 0.00B)
    from dft_ds import plan

    n_params = sum(p.numel() for p in model.parameters())
    assert plan.main(["--model", str(out), "--gpus-per-node", "1", "--gpu-memory", "24", "--max-length", "128"]) == 0
    assert capsys.readouterr().out.startswith(f"{plan.format_count(n_params)} parameters; 1 GPU of 24 GiB")


def test_a_run_directory_without_a_checkpoint_names_where_it_looked(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    proc = run_cli(run_dir, tmp_path / "hf", tmp_path=tmp_path)
    assert proc.returncode == EXIT_BAD_INPUT
    assert f"dft-convert: error: {run_dir / 'checkpoints'}: no 'latest' file" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "hf").exists()
