"""Flat configs from LLaMA-Factory, TRL and the HF Trainer: `dft-train --translate` writes a sectioned
config that loads with the meaning the user wrote, and lists what has no equivalent; the flat file
itself is refused with the same account, one key per line."""

from __future__ import annotations

import json

import pytest
import yaml

from dft_ds.config import load_config, translate_flat_file
from dft_ds.errors import ConfigError
from dft_ds.translate import render

# LLaMA-Factory's examples/train_full/*.yaml shape, with its DFT flag
LLAMA_FACTORY = """\
### model
model_name_or_path: Qwen/Qwen2.5-Math-1.5B
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: full
deepspeed: ds_z3_config.json
use_dft_loss: true

### dataset
dataset: numina_sharegpt
dataset_dir: {dataset_dir}
template: qwen
cutoff_len: 2048
max_samples: 100000
overwrite_cache: true
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: saves/qwen2.5-math-1.5b/full/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 2
learning_rate: 1.0e-5
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null
enable_liger_kernel: true
val_size: 0.05
eval_steps: 200
"""

# `trl sft --config` shape (TRL's SFTConfig and its model/PEFT arguments)
TRL = """\
model_name_or_path: Qwen/Qwen3-0.6B
dataset_name: trl-lib/Capybara
learning_rate: 2e-5
num_train_epochs: 1
packing: true
per_device_train_batch_size: 2
gradient_accumulation_steps: 8
gradient_checkpointing: true
loss_type: dft
max_length: 4096
warmup_steps: 50
max_steps: 1000
lr_scheduler_type: cosine_with_min_lr
lr_scheduler_kwargs:
  min_lr_rate: 0.1
use_peft: true
lora_r: 32
lora_alpha: 16
lora_target_modules: [q_proj, k_proj, v_proj, o_proj]
report_to: [wandb, tensorboard]
output_dir: Qwen3-0.6B-DFT
push_to_hub: true
bf16: true
"""


def llama_factory_files(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset_info.json").write_text(json.dumps({
        "numina_sharegpt": {"file_name": "numina.json", "formatting": "sharegpt",
                            "columns": {"messages": "conversations", "system": "system", "tools": "tools"}},
        "qa": {"file_name": "qa.jsonl", "columns": {"prompt": "question", "response": "answer"}},
        "chat_openai": {"file_name": "chat.jsonl", "formatting": "sharegpt", "columns": {"messages": "messages"},
                        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                 "assistant_tag": "assistant"}}}))
    path = tmp_path / "qwen_full_dft.yaml"
    path.write_text(LLAMA_FACTORY.format(dataset_dir=data), encoding="utf-8")
    return path, data


def translated_config(tmp_path, path):
    out = tmp_path / "dft.yaml"
    out.write_text(render(translate_flat_file(str(path)), str(path)), encoding="utf-8")
    return load_config(out), out


def test_a_llama_factory_yaml_translates_to_the_settings_it_meant(tmp_path):
    path, data = llama_factory_files(tmp_path)
    cfg, out = translated_config(tmp_path, path)
    assert (cfg.model.name_or_path, cfg.model.trust_remote_code, cfg.model.lora) == ("Qwen/Qwen2.5-Math-1.5B", True,
                                                                                     False)
    assert (cfg.data.source, cfg.data.format, cfg.data.template) == (str(data / "numina.json"), "sharegpt", "chat")
    assert (cfg.data.max_length, cfg.data.max_samples, cfg.data.num_workers, cfg.data.eval_fraction) == (
        2048, 100000, 16, 0.05)
    assert cfg.loss.type == "dft" and cfg.deepspeed.config == "ds_z3_config.json"
    assert (cfg.train.micro_batch_size, cfg.train.gradient_accumulation_steps, cfg.train.lr, cfg.train.epochs,
            cfg.train.warmup_ratio, cfg.train.precision) == (1, 2, 1e-5, 3.0, 0.1, "bf16")
    assert (cfg.train.output_dir, cfg.checkpoint.every_steps, cfg.logging.every_steps, cfg.eval.loss_every) == (
        "saves/qwen2.5-math-1.5b/full/sft", 500, 10, 200)
    assert cfg.logging.report_to == "none" and not cfg.logging.tensorboard
    text = out.read_text()
    assert "#   enable_liger_kernel: true (no equivalent in dft_ds" in text
    assert "stage" in text.split("# Needed nothing")[1].split("\n")[0]


@pytest.mark.parametrize("dataset,settings", [
    ("qa", {"format": "prompt_response", "prompt_field": "question", "response_field": "answer"}),
    ("chat_openai", {"format": "messages", "messages_field": "messages"}),
])
def test_dataset_info_entries_give_the_layout(tmp_path, dataset, settings):
    path, data = llama_factory_files(tmp_path)
    path.write_text(path.read_text().replace("dataset: numina_sharegpt", f"dataset: {dataset}"))
    cfg, _ = translated_config(tmp_path, path)
    assert {k: getattr(cfg.data, k) for k in settings} == settings


def test_a_trl_yaml_translates_to_the_settings_it_meant(tmp_path):
    path = tmp_path / "trl.yaml"
    path.write_text(TRL, encoding="utf-8")
    cfg, out = translated_config(tmp_path, path)
    assert (cfg.model.lora, cfg.model.lora_rank, cfg.model.lora_alpha, cfg.model.lora_targets) == (
        True, 32, 16.0, "q_proj,k_proj,v_proj,o_proj")
    assert cfg.model.gradient_checkpointing and cfg.data.packing and cfg.data.max_length == 4096
    assert (cfg.data.source, cfg.loss.type, cfg.train.lr, cfg.train.max_steps) == ("trl-lib/Capybara", "dft", 2e-5,
                                                                                   1000)
    # 50 warmup steps of max_steps 1000; cosine down to a tenth of the peak
    assert (cfg.train.warmup_ratio, cfg.train.min_lr_ratio) == (0.05, 0.1)
    assert cfg.logging.tensorboard and cfg.logging.report_to == "wandb"
    assert "#   push_to_hub: true (no equivalent in dft_ds: upload the directory dft-convert writes)" in out.read_text()


def test_trl_nll_loss_is_sft_and_an_unknown_loss_is_listed(tmp_path):
    path = tmp_path / "f.yaml"
    path.write_text("loss_type: nll\n")
    assert translated_config(tmp_path, path)[0].loss.type == "sft"
    path.write_text("loss_type: chunked_nll\nstage: dpo\n")
    t = translate_flat_file(str(path))
    assert t.left_out == ["loss_type: chunked_nll (loss.type takes dft, sft, power, mix, asft, eaft, only_top_p, "
                          "only_bottom_p)",
                          "stage: dpo (dft_ds trains supervised objectives only (loss.type); offline RL is "
                          "dft-sample, docs/offline_rl.md)"]


def test_the_flat_file_itself_is_refused_with_the_translation_one_key_per_line(tmp_path):
    path, _ = llama_factory_files(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    lines = str(info.value).splitlines()
    assert f"`dft-train --translate {path} > dft.yaml` writes it with sections" in lines[2]
    assert "      use_dft_loss: true -> loss.type=dft" in lines
    assert "      deepspeed: ds_z3_config.json -> deepspeed.config=ds_z3_config.json (a JSON of your own; dft_ds " \
           "fills its 'auto' values)" in lines
    assert "      template: qwen -> data.template=chat (the tokenizer's own chat template; LLaMA-Factory's template " \
           "'qwen' is not read)" in lines
    assert ("      enable_liger_kernel: true (no equivalent in dft_ds: no Liger kernels; the loss head is fused by "
            "dft_ds itself (loss.fused))") in lines
    needless = "\n".join(lines[lines.index("      enable_liger_kernel: true (no equivalent in dft_ds: no Liger kernels; "
                                          "the loss head is fused by dft_ds itself (loss.fused))") + 1:])
    head, names = " ".join(part.strip() for part in needless.split("\n")).split(": ", 1)
    assert head.strip() == "and needs nothing for (dft_ds does that anyway)"
    assert [n.strip() for n in names.split(",")] == [
        "stage", "do_train", "finetuning_type", "dataset_dir", "overwrite_cache", "dataloader_num_workers",
        "overwrite_output_dir", "save_only_model", "lr_scheduler_type", "resume_from_checkpoint"]
    assert max(len(line.replace(str(tmp_path), "")) for line in lines) < 160


def test_the_command_prints_yaml_on_stdout_and_the_left_out_keys_on_stderr(tmp_path, capsys):
    from dft_ds import train

    path = tmp_path / "trl.yaml"
    path.write_text(TRL, encoding="utf-8")
    assert train.main(["--translate", str(path)]) == 0
    out, err = capsys.readouterr()
    assert yaml.safe_load(out)["loss"] == {"type": "dft"}
    assert f"dft-train: translated 21 settings of {path}; 1 has no equivalent here" in err
    sectioned = tmp_path / "sectioned.yaml"
    sectioned.write_text(out)
    assert train.main(["--translate", str(sectioned)]) == 2
    assert "nothing to translate" in capsys.readouterr().err
    assert train.main(["--translate", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: No such file or directory" in capsys.readouterr().err
