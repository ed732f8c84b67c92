"""Bad input through the entry point: exit code 2, a message naming file/line/key, and no run
directory left behind (or an existing one left untouched).

The first case runs the real program (its exit code through train.cli); the rest call its main
in-process (the dft_train fixture), which returns the code the program exits with."""

import json
import os
import subprocess
import sys

import pytest

from tests.distributed.helpers import clean_env

pytestmark = pytest.mark.slow


def program(tmp_path, *overrides):
    cmd = [sys.executable, "-m", "dft_ds.train", *overrides]
    return subprocess.run(cmd, env=clean_env(tmp_path), capture_output=True, text=True, timeout=300)


@pytest.fixture
def train(dft_train):
    def call(tmp_path, *overrides, config=None):
        return dft_train(*([str(config)] if config else []), *overrides)
    return call


def assert_bad_input(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr[-3000:])


def write_jsonl(path, rows, raw_lines=()):
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
        for line in raw_lines:
            fh.write(line + "\n")
    return path


GOOD = [{"prompt": f"What is {i} + {i}?", "response": f"{i} + {i} = {2 * i}. \\boxed{{{2 * i}}}"} for i in range(20)]


def test_malformed_json_line_names_file_and_line(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", GOOD[:2], raw_lines=['{"prompt": "x", "response": '])
    out = tmp_path / "run"
    proc = program(tmp_path, f"data.source={data}", f"train.output_dir={out}")
    assert_bad_input(proc, f"{data}:3", "not valid JSON")
    assert not out.exists()


def test_missing_field_names_field_and_line(tmp_path, train):
    data = write_jsonl(tmp_path / "d.jsonl", GOOD[:3] + [{"prompt": "only a prompt"}])
    out = tmp_path / "run"
    proc = train(tmp_path, f"data.source={data}", f"train.output_dir={out}")
    assert_bad_input(proc, f"{data}:4", "missing field 'response'")
    assert not out.exists()


def test_nothing_left_after_filtering(tmp_path, train):
    data = write_jsonl(tmp_path / "d.jsonl", GOOD)
    out = tmp_path / "run"
    proc = train(tmp_path, f"data.source={data}", "data.max_length=8", "data.overlong=drop", f"train.output_dir={out}")
    assert_bad_input(proc, "no samples left after filtering", "dropped 20 over max_length")
    assert not out.exists()


def test_tokenizer_larger_than_model_vocabulary(tmp_path, train):
    from transformers import AutoTokenizer

    from dft_ds import synthetic

    model_dir = tmp_path / "model"
    synthetic.tiny_model_config(100).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(synthetic.ensure_assets()).save_pretrained(model_dir)
    out = tmp_path / "run"
    proc = train(tmp_path, f"model.name_or_path={model_dir}", f"train.output_dir={out}")
    assert_bad_input(proc, "the tokenizer has 512 tokens but the model's embeddings hold 100")
    assert not out.exists()


def test_existing_run_directory_is_refused_and_untouched(tmp_path, train):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    proc = train(tmp_path, f"train.output_dir={out}")
    assert_bad_input(proc, "already holds files")
    assert os.listdir(out) == ["metrics.jsonl"] and (out / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_config_errors_are_all_reported(tmp_path, train):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  lrr: 0.1\n  micro_batch_size: zero\nloss:\n  type: kl\n")
    proc = train(tmp_path, "train.lr=-1", config=cfg)
    assert_bad_input(proc, "did you mean 'train.lr'", "train.micro_batch_size: expected int",
                     "loss.type: expected one of dft, sft", "train.lr: expected a finite number > 0")


def test_batch_sizes_that_do_not_divide(tmp_path, train):
    out = tmp_path / "run"
    proc = train(tmp_path, "train.micro_batch_size=3", "train.global_batch_size=8", f"train.output_dir={out}")
    assert_bad_input(proc, "train.global_batch_size: 8 is not divisible by micro_batch_size 3 x world size 1")
    assert not out.exists()


def test_deepspeed_config_that_is_not_json(tmp_path, train):
    ds = tmp_path / "ds.json"
    ds.write_text('{\n  "train_batch_size": "auto",\n  oops\n}\n')
    out = tmp_path / "run"
    proc = train(tmp_path, f"deepspeed.config={ds}", "data.synthetic_size=100", f"train.output_dir={out}")
    assert_bad_input(proc, f"{ds}:3", "not valid JSON")
    assert not out.exists()


def test_deepspeed_config_that_contradicts_the_run(tmp_path, train):
    ds = tmp_path / "ds.json"
    template = json.load(open(os.path.join(os.path.dirname(__file__), "..", "..", "ds_configs", "zero3.json")))
    template["train_micro_batch_size_per_gpu"] = 16
    ds.write_text(json.dumps(template))
    out = tmp_path / "run"
    proc = train(tmp_path, f"deepspeed.config={ds}", "data.synthetic_size=100", f"train.output_dir={out}")
    assert_bad_input(proc, "'train_micro_batch_size_per_gpu' is 16 but the run config gives 4")
    assert not out.exists()


# ---------------------------------------------------------------- the rest of the bad-input matrix

@pytest.mark.parametrize("rows, needles", [
    ([{"prompt": "a", "response": 7}], ["d.jsonl:1", "response"]),                 # wrong field type
    ([{"prompt": ["a"], "response": "b"}], ["d.jsonl:1", "prompt"]),               # wrong field type
    ([{"prompt": "a", "response": ""}], ["d.jsonl:1", "response"]),                # empty response
    ([{"prompt": "a", "response": "   "}], ["d.jsonl:1", "response"]),             # blank response
], ids=["int-response", "list-prompt", "empty-response", "blank-response"])
def test_bad_rows_name_file_line_and_field(tmp_path, rows, needles, train):
    data = write_jsonl(tmp_path / "d.jsonl", GOOD[:3] + rows)
    out = tmp_path / "run"
    proc = train(tmp_path, f"data.source={data}", f"train.output_dir={out}")
    assert_bad_input(proc, *[n.replace("d.jsonl:1", f"{data}:4") for n in needles])
    assert not out.exists()


def test_mistyped_value_and_unknown_key_on_the_command_line(tmp_path, train):
    out = tmp_path / "run"
    proc = train(tmp_path, "train.max_steps=ten", "loss.prob_flor=0.1", f"train.output_dir={out}")
    assert_bad_input(proc, "train.max_steps: expected", "unknown key 'loss.prob_flor'", "did you mean 'loss.prob_floor'")
    assert not out.exists()


def test_model_that_needs_remote_code_is_refused(tmp_path, train):
    model_dir = tmp_path / "remote"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({
        "model_type": "dft-ds-remote-test", "architectures": ["RemoteLM"],
        "auto_map": {"AutoConfig": "configuration_remote.RemoteConfig",
                     "AutoModelForCausalLM": "modeling_remote.RemoteLM"}}))
    # The code it would run: must never execute without model.trust_remote_code=true.
    marker = tmp_path / "executed"
    (model_dir / "configuration_remote.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    from transformers import AutoTokenizer

    from dft_ds import synthetic

    AutoTokenizer.from_pretrained(synthetic.ensure_assets()).save_pretrained(model_dir)
    out = tmp_path / "run"
    proc = train(tmp_path, f"model.name_or_path={model_dir}", f"train.output_dir={out}")
    assert_bad_input(proc, "needs its own code to run", "model.trust_remote_code=true")
    assert not marker.exists() and not out.exists()


def test_too_few_rows_says_packing_made_them_and_how_to_fit(tmp_path, train):
    out = tmp_path / "run"
    proc = train(tmp_path, f"train.output_dir={out}", "data.synthetic_size=200", "train.global_batch_size=64",
                 "train.micro_batch_size=4")
    assert_bad_input(proc, "fewer than one global batch of 64 rows (train.global_batch_size)",
                     "packing (data.packing=true) made them from 200 samples",
                     "set data.packing=false for up to 200 rows")
    rows = int(proc.stderr.split("the data gives ")[1].split(" rows")[0])
    assert rows < 64 and f"lower train.global_batch_size to at most {rows}" in proc.stderr
    assert not out.exists()
