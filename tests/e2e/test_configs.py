"""Every shipped file in configs/ passes `dft-train --check`, the paper recipe included.

A config that names a hub model or dataset gets a local stand-in of the same kind (nothing is
downloaded here): for a model, a directory with a config of the named family and a tokenizer with a
chat template; for a dataset, a JSON-lines file with the fields the config's preset reads. Every
other setting is the file's own, so the batch arithmetic, precision and DeepSpeed template of the
recipe are what is checked.
"""

import json
import os

import pytest

from dft_ds import synthetic, train
from dft_ds.config import PRESETS, SYNTHETIC, load_config
from tests.distributed.helpers import REPO

pytestmark = pytest.mark.slow
CONFIGS = sorted(os.path.join(REPO, "configs", n) for n in os.listdir(os.path.join(REPO, "configs"))
                 if n.endswith((".yaml", ".yml")))


def is_local(path: str) -> bool:
    return path == SYNTHETIC or os.path.exists(path)


def model_stand_in(tmp_path, name: str) -> str:
    """A tiny model of the named family (its config class) with the synthetic tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    family = "qwen2" if "qwen2" in name.lower() else "llama"
    tok = AutoTokenizer.from_pretrained(synthetic.ensure_assets())
    config = AutoConfig.for_model(family, vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    path = tmp_path / "model"
    config.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def data_stand_in(tmp_path, cfg, rows: int) -> str:
    fields = PRESETS.get(cfg.data.preset, {})
    prompt, response = fields.get("prompt_field", cfg.data.prompt_field), fields.get("response_field",
                                                                                      cfg.data.response_field)
    path = tmp_path / "data.jsonl"
    with open(path, "w") as fh:
        for i in range(rows):
            fh.write(json.dumps({prompt: f"What is {i} + {i}?", response: f"{i} + {i} = {2 * i}. \\boxed{{{2 * i}}}"})
                     + "\n")
    return str(path)


def test_configs_are_found():
    names = [os.path.basename(p) for p in CONFIGS]
    assert "tiny.yaml" in names and "qwen2.5-math-1.5b_numina.yaml" in names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_shipped_config_passes_check(tmp_path, monkeypatch, capsys, path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config(path)
    world = 8
    overrides = [f"train.output_dir={tmp_path / 'run'}"]
    if not is_local(cfg.model.name_or_path):
        overrides.append(f"model.name_or_path={model_stand_in(tmp_path, cfg.model.name_or_path)}")
    if not is_local(cfg.data.source):
        # Enough samples for two optimizer steps at the recipe's global batch.
        rows = 2 * (cfg.train.global_batch_size or cfg.train.micro_batch_size * world)
        overrides.append(f"data.source={data_stand_in(tmp_path, cfg, rows)}")
    code = train.main(["--check", path, "--world-size", str(world), *overrides])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "dft-train --check: OK" in out
    micro, total = cfg.train.micro_batch_size, cfg.train.global_batch_size or cfg.train.micro_batch_size * world
    assert f"micro {micro} x accumulation {total // (micro * world)} x world {world} = global {total} rows" in out
    assert f"loss: {cfg.loss.type} (fused head)" in out
    assert not (tmp_path / "run").exists()


def test_a_translated_llama_factory_yaml_trains(tmp_path):
    """A flat LLaMA-Factory YAML (dataset_info.json, ShareGPT data, its DeepSpeed JSON, use_dft_loss) is
    refused with its translation; `dft-train --translate` writes a config that trains with DFT."""
    import subprocess
    import sys

    from tests.distributed.helpers import QUICK, SMALL, clean_env, read_metrics
    from tests.unit.test_engine import LLAMA_FACTORY_Z3

    data = tmp_path / "data"
    data.mkdir()
    rows = [{"conversations": [{"from": "human", "value": ex["prompt"]}, {"from": "gpt", "value": ex["response"]}],
             "system": "Solve it."} for ex in synthetic.generate_examples(64, 0, "train")]
    (data / "math.json").write_text(json.dumps(rows))
    (data / "dataset_info.json").write_text(json.dumps({"math_sharegpt": {
        "file_name": "math.json", "formatting": "sharegpt", "columns": {"messages": "conversations", "system": "system"}}}))
    (tmp_path / "ds_z3_config.json").write_text(json.dumps(LLAMA_FACTORY_Z3))
    (tmp_path / "lf.yaml").write_text(
        "model_name_or_path: synthetic\nstage: sft\ndo_train: true\nfinetuning_type: full\n"
        "deepspeed: ds_z3_config.json\nuse_dft_loss: true\ndataset: math_sharegpt\ntemplate: llama3\n"
        "cutoff_len: 192\noutput_dir: run\nlearning_rate: 2.0e-3\nmax_steps: 3\nreport_to: none\n"
        "enable_liger_kernel: true\n")
    env = clean_env(tmp_path)

    def dft_train(*args):
        return subprocess.run([sys.executable, "-m", "dft_ds.train", *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)

    refused = dft_train("--check", "lf.yaml")
    assert refused.returncode == 2 and "      use_dft_loss: true -> loss.type=dft" in refused.stderr.splitlines()
    translated = dft_train("--translate", "lf.yaml")
    assert translated.returncode == 0, translated.stderr
    (tmp_path / "dft.yaml").write_text(translated.stdout)
    proc = dft_train("dft.yaml", *QUICK, *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "layout ShareGPT (conversations: from/value), set by data.format=sharegpt" in proc.stdout
    assert len(read_metrics(tmp_path / "run")) == 3
    import yaml

    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["loss"]["type"] == "dft" and resolved["deepspeed"]["config"] == "ds_z3_config.json"


def test_a_llama_factory_deepspeed_json_trains(tmp_path):
    """LLaMA-Factory's ds_z3_config.json shape (no optimizer block) with an HF-style WarmupLR block: a real
    ZeRO-3 start trains with AdamW from train.* and the run's own schedule (this died in engine.lr)."""
    import subprocess
    import sys

    from tests.distributed.helpers import QUICK, SMALL, clean_env, read_metrics
    from tests.unit.test_engine import LLAMA_FACTORY_Z3

    ds = tmp_path / "ds_z3_config.json"
    ds.write_text(json.dumps({**LLAMA_FACTORY_Z3, "scheduler": {"type": "WarmupLR", "params": {
        "warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto"}}}))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "dft_ds.train", *QUICK, *SMALL, f"deepspeed.config={ds}",
                           f"train.output_dir={out}", "train.max_steps=3", "train.lr=0.002", "train.warmup_ratio=0"],
                          env=clean_env(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"the scheduler block of {ds} (WarmupLR) is not used" in proc.stderr + proc.stdout
    lrs = [row["lr"] for row in read_metrics(out)]
    assert len(lrs) == 3 and lrs[0] == pytest.approx(0.002) and lrs[0] > lrs[1] > lrs[2] > 0  # cosine, no warmup
