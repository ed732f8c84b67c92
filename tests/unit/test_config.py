"""The run configuration: precedence (defaults < YAML < command line), the synthetic profile, every
error reported at once with the key and what was expected, batch arithmetic, presets, round trips,
a docstring per field, and the `dft-train` front door (--help, exit code 2 without a traceback)."""

from __future__ import annotations

import dataclasses
import re
import textwrap

import pytest

from dft_ds import train
from dft_ds.config import (
    SYNTHETIC_PROFILE,
    Config,
    DataConfig,
    LossConfig,
    TrainConfig,
    describe_fields,
    load_config,
    save_config,
)
from dft_ds.batch import resolve_batch
from dft_ds.errors import EXIT_BAD_INPUT, ConfigError

REAL_MODEL = "org/some-real-model"  # any name_or_path other than "synthetic": the profile stays off


def write_yaml(tmp_path, text: str, name: str = "run.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def config_error(path=None, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return str(info.value)


def problem_lines(message: str) -> list[str]:
    return [line for line in message.splitlines() if line.startswith("  - ")]


# ---------------------------------------------------------------- precedence


def test_precedence_defaults_then_file_then_command_line(tmp_path):
    path = write_yaml(tmp_path, f"""
        model:
          name_or_path: {REAL_MODEL}
        train:
          lr: 0.02          # also on the command line: the command line wins
          seed: 7           # file only
        data:
          max_length: 256   # file only, other section
    """)
    cfg = load_config(path, ["train.lr=0.01", "train.micro_batch_size=2", "loss.type=sft"])
    assert cfg.train.lr == 0.01                      # defaults < file < command line
    assert cfg.train.seed == 7                       # file beats default
    assert cfg.data.max_length == 256
    assert cfg.train.micro_batch_size == 2           # command line beats default
    assert cfg.loss.type == "sft"
    assert cfg.train.weight_decay == TrainConfig().weight_decay  # set nowhere: default
    assert cfg.data.source == DataConfig().source
    # A partial section in the file does not reset the section's other keys.
    assert cfg.train.warmup_ratio == TrainConfig().warmup_ratio


def test_file_without_overrides_and_overrides_without_file(tmp_path):
    path = write_yaml(tmp_path, f"model:\n  name_or_path: {REAL_MODEL}\ntrain:\n  lr: 0.02\n")
    assert load_config(path).train.lr == 0.02
    assert load_config(None, [f"model.name_or_path={REAL_MODEL}", "train.lr=0.03"]).train.lr == 0.03
    assert load_config(None, [f"model.name_or_path={REAL_MODEL}"]).train.lr == TrainConfig().lr


def test_later_override_of_the_same_key_wins():
    cfg = load_config(None, ["train.seed=1", "train.seed=2"])
    assert cfg.train.seed == 2


def test_empty_yaml_file_and_null_section_mean_defaults(tmp_path):
    assert load_config(write_yaml(tmp_path, "", "empty.yaml")) == load_config()
    assert load_config(write_yaml(tmp_path, "train:\n", "null_section.yaml")) == load_config()


# ---------------------------------------------------------------- the synthetic profile


def test_synthetic_profile_applies_by_default():
    cfg = load_config()
    assert cfg.model.name_or_path == "synthetic"
    for section, values in SYNTHETIC_PROFILE.items():
        for name, value in values.items():
            assert getattr(getattr(cfg, section), name) == value, f"{section}.{name}"
    # Pinned values, so a silent edit of the profile is noticed.
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.warmup_ratio, cfg.loss.prob_floor) == (1e-3, 2.0, 0.05, 0.1)


def test_synthetic_profile_applies_when_named_explicitly(tmp_path):
    assert load_config(None, ["model.name_or_path=synthetic"]).loss.prob_floor == 0.1
    path = write_yaml(tmp_path, "model:\n  name_or_path: synthetic\n")
    assert load_config(path).train.lr == 1e-3


def test_synthetic_profile_not_applied_to_a_real_model(tmp_path):
    for cfg in (load_config(None, [f"model.name_or_path={REAL_MODEL}"]),
                load_config(write_yaml(tmp_path, f"model:\n  name_or_path: {REAL_MODEL}\n"))):
        assert cfg.train.lr == TrainConfig().lr == 5e-5
        assert cfg.train.epochs == TrainConfig().epochs
        assert cfg.train.warmup_ratio == TrainConfig().warmup_ratio
        assert cfg.loss.prob_floor == LossConfig().prob_floor == 0.0


def test_file_and_command_line_win_over_synthetic_profile(tmp_path):
    path = write_yaml(tmp_path, "train:\n  lr: 0.003\n")
    cfg = load_config(path, ["loss.prob_floor=0"])
    assert cfg.train.lr == 0.003          # file over profile
    assert cfg.loss.prob_floor == 0.0     # command line over profile
    assert cfg.train.epochs == 2.0        # untouched profile keys still apply
    assert cfg.train.warmup_ratio == 0.05


def test_real_model_on_command_line_switches_profile_off_for_a_synthetic_file(tmp_path):
    path = write_yaml(tmp_path, "model:\n  name_or_path: synthetic\n")
    cfg = load_config(path, [f"model.name_or_path={REAL_MODEL}"])
    assert cfg.train.lr == 5e-5 and cfg.loss.prob_floor == 0.0


# ---------------------------------------------------------------- errors


def test_key_and_type_problems_are_all_reported_in_one_error():
    message = config_error(None, [
        "train.lrr=1",                    # unknown key
        "trian.seed=3",                   # unknown section
        "train.micro_batch_size=abc",     # text for an int
        "train.max_steps=1.5",            # float for an int
        "train.seed=true",                # bool for an int
        "logging.tensorboard=3",          # int for a bool
        "train.lr=fast",                  # text for a float
        "nodot=1",                        # no section
        "train.lr",                       # no '='
        "a.b.c=1",                        # too many dots
    ])
    assert "unknown key 'train.lrr'" in message and "did you mean 'train.lr'" in message
    assert "unknown section 'trian'" in message and "did you mean 'train'" in message
    assert re.search(r"train\.micro_batch_size: expected int\b.*'abc'", message)
    assert re.search(r"train\.max_steps: expected int or null.*1\.5", message)
    assert re.search(r"train\.seed: expected int\b.*True", message)
    assert re.search(r"logging\.tensorboard: expected bool.*3", message)
    assert re.search(r"train\.lr: expected float.*'fast'", message)
    assert "override 'nodot=1': expected section.key=value" in message
    assert "override 'train.lr': expected section.key=value" in message
    assert "override 'a.b.c=1': expected section.key=value" in message
    assert len(problem_lines(message)) == 10
    assert message.startswith("invalid configuration (10 problems):")


def test_impossible_values_are_all_reported_in_one_error():
    message = config_error(None, [
        "train.lr=0",
        "train.warmup_ratio=1",
        "data.max_length=4",
        "loss.type=foo",
        "train.micro_batch_size=0",
        "loss.prob_floor=1.5",
        "data.preset=alpaca",
    ])
    assert re.search(r"train\.lr: expected a finite number > 0, got 0\.0", message)
    assert re.search(r"train\.warmup_ratio: expected a number in \[0, 1\), got 1\.0", message)
    assert re.search(r"data\.max_length: expected an integer >= 8, got 4", message)
    assert "loss.type: expected one of dft, sft, power, mix, asft, eaft, only_top_p, only_bottom_p, got 'foo'" in message
    assert "train.micro_batch_size: expected an integer >= 1, got 0" in message
    assert "loss.prob_floor" in message
    assert "data.preset: expected one of numina_cot, got 'alpaca'" in message
    assert len(problem_lines(message)) == 7


@pytest.mark.parametrize("override, expected", [
    ("train.lr=-1e-4", "train.lr: expected a finite number > 0, got -0.0001"),
    ("train.lr=.inf", "train.lr: expected a finite number > 0, got inf"),
    ("train.epochs=0", "train.epochs: expected a finite number > 0, got 0.0"),
    ("train.adam_beta2=1", "train.adam_beta2: expected a number in [0, 1), got 1.0"),
    ("train.global_batch_size=0", "train.global_batch_size: expected null or an integer >= 1, got 0"),
    ("data.max_samples=0", "data.max_samples: expected null or an integer >= 1, got 0"),
    ("model.attn_implementation=flash", "model.attn_implementation: expected one of auto, eager, sdpa, "
                                        "flash_attention_2, flex_attention, got 'flash'"),
    ("train.precision=fp8", "train.precision: expected one of auto, bf16, fp16, fp32, got 'fp8'"),
    ("loss.type=kto", "loss.type: expected one of dft, sft, power, mix, asft, eaft, only_top_p, only_bottom_p, "
                      "got 'kto'"),
    ("loss.alpha=-0.5", "loss.alpha: expected a finite number >= 0 (0 is sft, 1 is dft), got -0.5"),
    ("loss.mix_start=-1", "loss.mix_start: expected an integer >= 0, got -1"),
    ("loss.kl_coef=-1", "loss.kl_coef: expected a finite number >= 0, got -1.0"),
    ("train.weight_decay=.inf", "train.weight_decay: expected a finite number >= 0, got inf"),
    ("train.adam_eps=.inf", "train.adam_eps: expected a finite number > 0, got inf"),
    ("loss.fused=yes", "loss.fused: expected one of auto, true, false, got 'yes'"),
    ("loss.chunk_mb=0", "loss.chunk_mb: expected an integer >= 1, got 0"),
    ("logging.hist_every=-1", "logging.hist_every: expected an integer >= 0 (0: never), got -1"),
])
def test_each_impossible_value_names_its_key(override, expected):
    # The whole line: the key, what it takes, and the value given (an echo of the override is not enough).
    assert problem_lines(config_error(None, [override])) == [f"  - {expected}"]


def test_mix_end_before_mix_start_is_refused():
    message = config_error(None, ["loss.type=mix", "loss.mix_start=100", "loss.mix_end=50"])
    assert "loss.mix_end" in message and ">= loss.mix_start (100)" in message


@pytest.mark.parametrize("text, expected", [("true", "true"), ("false", "false"), ("auto", "auto")])
def test_fused_accepts_yaml_booleans_from_file_and_command_line(tmp_path, text, expected):
    path = tmp_path / "c.yaml"
    path.write_text(f"loss:\n  fused: {text}\n")
    assert load_config(str(path)).loss.fused == expected
    assert load_config(None, [f"loss.fused={text}"]).loss.fused == expected


def test_choices_error_lists_every_choice():
    message = config_error(None, ["train.precision=fp8"])
    for choice in ("auto", "bf16", "fp16", "fp32"):
        assert choice in message


def test_global_batch_not_a_multiple_of_micro_times_accumulation():
    message = config_error(None, ["train.micro_batch_size=4", "train.gradient_accumulation_steps=3",
                                  "train.global_batch_size=32"])
    assert "train.global_batch_size" in message and "12" in message


def test_key_errors_and_value_errors_are_reported_together():
    message = config_error(None, ["train.lrr=1", "train.lr=0", "loss.type=foo"])
    assert "train.lrr" in message
    assert "train.lr: expected a finite number > 0" in message
    assert "loss.type: expected one of dft, sft" in message


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write_yaml(tmp_path, "train:\n  lr: 0.1\n  seed: a: b\n", "broken.yaml")
    message = config_error(path)
    assert f"{path}:3" in message
    assert "not valid YAML" in message


def test_yaml_top_level_must_be_a_mapping(tmp_path):
    path = write_yaml(tmp_path, "- train\n- model\n", "list.yaml")
    message = config_error(path)
    assert str(path) in message and "expected a mapping of sections" in message and "list" in message


def test_yaml_section_must_be_a_mapping(tmp_path):
    path = write_yaml(tmp_path, "train: 5\n", "scalar_section.yaml")
    message = config_error(path)
    assert str(path) in message and "section 'train' must be a mapping" in message


def test_missing_file_is_reported_with_the_override_problems(tmp_path):
    path = tmp_path / "nope.yaml"
    message = config_error(path, ["train.lrr=1", "oops"])
    assert f"{path}: config file not found" in message
    assert "unknown key 'train.lrr'" in message
    assert "override 'oops'" in message
    assert len(problem_lines(message)) == 3


def test_unknown_key_in_yaml_file_is_reported_with_suggestion(tmp_path):
    path = write_yaml(tmp_path, "data:\n  max_lenght: 128\nlogging:\n  every_step: 5\n")
    message = config_error(path)
    assert "unknown key 'data.max_lenght'" in message and "did you mean 'data.max_length'" in message
    assert "unknown key 'logging.every_step'" in message and "did you mean 'logging.every_steps'" in message


def test_unknown_key_with_nothing_close_has_no_suggestion():
    message = config_error(None, ["train.zzzzzzzz=1"])
    assert "unknown key 'train.zzzzzzzz'" in message
    assert "did you mean" not in message


def test_config_error_is_a_user_error():
    from dft_ds.errors import UserError

    assert issubclass(ConfigError, UserError)


# ---------------------------------------------------------------- YAML 1.1 floats


def test_float_fields_accept_exponent_without_dot_from_file(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-5 as the string "1e-5".
    path = write_yaml(tmp_path, "train:\n  lr: 1e-5\n  adam_eps: 1e-8\n  epochs: 3\n")
    cfg = load_config(path)
    assert cfg.train.lr == 1e-5 and type(cfg.train.lr) is float
    assert cfg.train.adam_eps == 1e-8 and type(cfg.train.adam_eps) is float
    assert cfg.train.epochs == 3.0 and type(cfg.train.epochs) is float  # int accepted for a float


def test_float_fields_accept_exponent_without_dot_from_command_line():
    cfg = load_config(None, ["train.lr=1e-5", "loss.prob_floor=5e-2"])
    assert cfg.train.lr == 1e-5 and type(cfg.train.lr) is float
    assert cfg.loss.prob_floor == 0.05


def test_exponent_text_is_not_accepted_for_an_int_field():
    assert problem_lines(config_error(None, ["train.max_steps=1e3"])) == [
        "  - train.max_steps: expected int or null, got '1e3' (str)"]


def test_text_fields_take_numbers_as_text():
    cfg = load_config(None, ["train.output_dir=123", "model.tokenizer=null"])
    assert cfg.train.output_dir == "123"
    assert cfg.model.tokenizer is None


# ---------------------------------------------------------------- batch arithmetic


def test_resolve_batch_without_global_defaults_accumulation_to_one():
    plan = resolve_batch(TrainConfig(micro_batch_size=4), world_size=2)
    assert (plan.micro_batch_size, plan.gradient_accumulation_steps, plan.world_size) == (4, 1, 2)
    assert plan.global_batch_size == 8


def test_resolve_batch_without_global_keeps_given_accumulation():
    plan = resolve_batch(TrainConfig(micro_batch_size=2, gradient_accumulation_steps=3), world_size=4)
    assert plan.gradient_accumulation_steps == 3
    assert plan.global_batch_size == 24


def test_resolve_batch_derives_accumulation_from_global():
    plan = resolve_batch(TrainConfig(micro_batch_size=4, global_batch_size=32), world_size=2)
    assert plan.gradient_accumulation_steps == 4
    assert plan.global_batch_size == 32


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_resolve_batch_derives_accumulation_for_each_world_size(world):
    plan = resolve_batch(TrainConfig(micro_batch_size=2, global_batch_size=64), world_size=world)
    assert plan.gradient_accumulation_steps == 32 // world
    assert plan.global_batch_size == 64


def test_resolve_batch_rejects_global_not_divisible_by_micro_times_world():
    with pytest.raises(ConfigError) as info:
        resolve_batch(TrainConfig(micro_batch_size=4, global_batch_size=30), world_size=2)
    assert "train.global_batch_size" in str(info.value)
    assert "30" in str(info.value)


def test_resolve_batch_rejects_accumulation_disagreeing_with_global():
    with pytest.raises(ConfigError) as info:
        resolve_batch(TrainConfig(micro_batch_size=4, gradient_accumulation_steps=2, global_batch_size=32),
                      world_size=2)
    assert "gradient_accumulation_steps" in str(info.value)
    assert "32" in str(info.value)


def test_resolve_batch_accepts_consistent_accumulation_and_global():
    plan = resolve_batch(TrainConfig(micro_batch_size=4, gradient_accumulation_steps=4, global_batch_size=32),
                         world_size=2)
    assert plan.gradient_accumulation_steps == 4
    assert plan.global_batch_size == 32


@pytest.mark.parametrize("micro, accum, world", [(1, 1, 1), (4, 1, 2), (2, 3, 4), (8, 16, 16)])
def test_batch_plan_global_is_micro_times_accumulation_times_world(micro, accum, world):
    plan = resolve_batch(TrainConfig(micro_batch_size=micro, gradient_accumulation_steps=accum), world_size=world)
    assert plan.global_batch_size == micro * accum * world


def test_paper_recipe_batch_on_eight_gpus():
    plan = resolve_batch(load_config(None, ["train.micro_batch_size=4", "train.global_batch_size=256"]).train, 8)
    assert plan.gradient_accumulation_steps == 8


# ---------------------------------------------------------------- presets


def test_numina_preset_sets_field_names():
    cfg = load_config(None, ["data.preset=numina_cot"])
    assert cfg.data.prompt_field == "problem"
    assert cfg.data.response_field == "solution"
    assert cfg.data.format == "prompt_response"


def test_explicit_field_wins_over_preset(tmp_path):
    cfg = load_config(None, ["data.preset=numina_cot", "data.prompt_field=question"])
    assert cfg.data.prompt_field == "question"
    assert cfg.data.response_field == "solution"
    path = write_yaml(tmp_path, "data:\n  preset: numina_cot\n  response_field: answer\n")
    cfg = load_config(path)
    assert (cfg.data.prompt_field, cfg.data.response_field) == ("problem", "answer")


def test_no_preset_keeps_default_field_names():
    cfg = load_config()
    assert (cfg.data.prompt_field, cfg.data.response_field) == ("prompt", "response")


# ---------------------------------------------------------------- save / load round trip


@pytest.mark.parametrize("overrides", [
    [],
    [f"model.name_or_path={REAL_MODEL}", "model.tokenizer=null", "data.max_samples=100",
     "train.global_batch_size=64", "train.lr=2e-5", "data.preset=numina_cot", "train.max_steps=10",
     "train.output_dir=123", "loss.type=sft"],
    ["model.tokenizer=tok/dir", "train.gradient_accumulation_steps=2", "train.adam_eps=1e-8",
     "logging.tensorboard=false", "checkpoint.save_final=false"],
])
def test_save_then_load_round_trips(tmp_path, overrides):
    cfg = load_config(None, overrides)
    path = tmp_path / "config.yaml"
    save_config(cfg, path, extra={"world_size": 2, "precision": "bf16"})
    again = load_config(path)
    assert again == cfg
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


def test_round_trip_keeps_none_values(tmp_path):
    cfg = load_config()
    assert cfg.model.tokenizer is None and cfg.train.global_batch_size is None and cfg.train.max_steps is None
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    again = load_config(path)
    assert again.model.tokenizer is None
    assert again.data.preset is None and again.data.max_samples is None
    assert again.train.gradient_accumulation_steps is None
    assert again.train.global_batch_size is None and again.train.max_steps is None
    assert again == cfg


# ---------------------------------------------------------------- field docs and --help


def _all_dotted_keys() -> set[str]:
    return {f"{section.name}.{f.name}"
            for section in dataclasses.fields(Config)
            for f in dataclasses.fields(section.default_factory)}


def test_describe_fields_covers_every_field_with_a_docstring():
    rows = describe_fields()
    keys = [row[0] for row in rows]
    assert len(keys) == len(set(keys))
    assert set(keys) == _all_dotted_keys()
    missing = [key for key, _type, _default, doc in rows if not doc.strip()]
    assert missing == [], f"fields without a docstring: {missing}"


def test_describe_fields_reports_types_and_defaults():
    rows = {key: (type_name, default) for key, type_name, default, _doc in describe_fields()}
    assert rows["train.lr"] == ("float", 5e-5)
    assert rows["train.max_steps"] == ("int or null", None)
    assert rows["model.name_or_path"] == ("str", "synthetic")
    assert rows["data.packing"] == ("bool", True)


def test_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit) as info:
        train.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for key, _type, _default, _doc in describe_fields():
        assert f"{key}:" in out, key
    assert "defaults" in out and "CONFIG.yaml" in out


def test_train_bad_overrides_exit_2_without_traceback(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = train.main([f"train.output_dir={run_dir}", "train.lrr=1", "loss.type=foo", "nodot=1"])
    assert code == EXIT_BAD_INPUT == 2
    captured = capsys.readouterr()
    assert "dft-train: error:" in captured.err
    assert "unknown key 'train.lrr'" in captured.err and "did you mean 'train.lr'" in captured.err
    assert "override 'nodot=1'" in captured.err
    assert "Traceback" not in captured.err + captured.out
    assert not run_dir.exists()


def test_train_bad_value_exits_2(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = train.main([f"train.output_dir={run_dir}", "loss.type=foo"])
    assert code == 2
    err = capsys.readouterr().err
    assert "loss.type: expected one of dft, sft" in err and "Traceback" not in err
    assert not run_dir.exists()


def test_train_stray_argument_after_first_exits_2(tmp_path, capsys):
    # Only the first argument may be a config file; argparse reports anything else (exit status 2).
    with pytest.raises(SystemExit) as info:
        train.main(["train.seed=1", "train.lr"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "'train.lr' is not a section.key=value override" in err and "Traceback" not in err


def test_train_missing_config_file_exits_2(tmp_path, capsys):
    path = tmp_path / "missing.yaml"
    assert train.main([str(path)]) == 2
    assert f"{path}: config file not found" in capsys.readouterr().err


def test_text_fields_take_command_line_text_verbatim():
    cfg = load_config(None, ["train.output_dir=0123", "model.name_or_path=12:30", "model.tokenizer=2024-01-01"])
    assert cfg.train.output_dir == "0123"
    assert cfg.model.name_or_path == "12:30"
    assert cfg.model.tokenizer == "2024-01-01"
    assert load_config(None, ["model.tokenizer=null"]).model.tokenizer is None


# ---------------------------------------------------------------- names people type


@pytest.mark.parametrize("typed, meant", [
    ("train.learning_rate", "train.lr"),
    ("train.bf16", "train.precision"),
    ("data.cutoff_len", "data.max_length"),
    ("train.save_steps", "checkpoint.every_steps"),
    ("train.gradient_checkpointing", "model.gradient_checkpointing"),
    ("train.per_device_train_batch_size", "train.micro_batch_size"),
    ("train.num_train_epochs", "train.epochs"),
    ("train.warmup_steps", "train.warmup_ratio"),
    ("data.seed", "train.seed"),                       # the right name in the wrong section
])
def test_unknown_key_is_suggested_by_meaning_across_sections(typed, meant):
    message = config_error(None, [f"{typed}=1"])
    assert f"unknown key '{typed}' (did you mean '{meant}'" in message


def test_save_steps_no_longer_suggests_max_steps():
    message = config_error(None, ["train.save_steps=100"])
    assert "max_steps" not in message and "checkpoint.every_steps" in message


def test_override_without_section_says_what_the_name_means():
    message = config_error(None, ["learning_rate=1e-5"])
    assert "override 'learning_rate=1e-5': expected section.key=value; 'learning_rate' -> train.lr" in message


def test_flat_yaml_gets_one_message_naming_the_setting_of_each_key(tmp_path):
    path = write_yaml(tmp_path, "learning_rate: 1.0e-5\ncutoff_len: 2048\nbf16: true\nnum_train_epochs: 3\n"
                                "warmup_ratio: 0.1\nfrobnicate: 2\ntrain:\n  seed: 3\n")
    message = config_error(path)
    assert message.startswith("invalid configuration (1 problem):")
    assert f"{path}: a flat config (6 keys outside dft_ds's sections" in message
    assert f"`dft-train --translate {path} > dft.yaml` writes it with sections" in message
    lines = message.splitlines()
    for part in ("learning_rate: 1e-05 -> train.lr=1e-05", "cutoff_len: 2048 -> data.max_length=2048",
                 "bf16: true -> train.precision=bf16", "num_train_epochs: 3 -> train.epochs=3",
                 "warmup_ratio: 0.1 -> train.warmup_ratio=0.1", "frobnicate: 2 (no equivalent in dft_ds)"):
        assert f"      {part}" in lines, part


# ---------------------------------------------------------------- batch errors name the nearest valid values


def test_indivisible_global_batch_suggests_the_nearest_multiples_and_micro_batches():
    with pytest.raises(ConfigError) as info:
        resolve_batch(load_config(None, ["train.global_batch_size=30", "train.micro_batch_size=4"]).train, 2)
    msg = str(info.value)
    assert "30 is not divisible by micro_batch_size 4 x world size 2 = 8" in msg
    assert "train.global_batch_size=24 or 32 (multiples of 8)" in msg
    assert "keep 30 with train.micro_batch_size=1 or 3 or 5" in msg
    for global_batch in (24, 32):  # what it suggests is valid
        resolve_batch(load_config(None, [f"train.global_batch_size={global_batch}", "train.micro_batch_size=4"]).train, 2)
    for micro in (1, 3, 5):
        resolve_batch(load_config(None, ["train.global_batch_size=30", f"train.micro_batch_size={micro}"]).train, 2)


def test_accumulation_mismatch_names_both_ways_out():
    cfg = load_config(None, ["train.global_batch_size=32", "train.micro_batch_size=4",
                             "train.gradient_accumulation_steps=4"])
    with pytest.raises(ConfigError, match=r"set train.gradient_accumulation_steps=8 \(or null, which derives it\), "
                                          r"or train.global_batch_size=16"):
        resolve_batch(cfg.train, 1)


def test_global_batch_not_a_multiple_of_micro_times_accumulation_names_neighbours():
    message = config_error(None, ["train.global_batch_size=30", "train.micro_batch_size=4",
                                  "train.gradient_accumulation_steps=4"])
    assert "the nearest valid values are 16 or 32, or set train.gradient_accumulation_steps=null" in message


def test_counts_in_messages_agree_in_number():
    from dft_ds.errors import counted

    assert [counted(n, "step") for n in (0, 1, 2)] == ["0 steps", "1 step", "2 steps"]
    assert counted(1, "rank") == "1 rank" and counted(3, "entry", "entries") == "3 entries"


@pytest.mark.parametrize("overrides, message", [
    (["model.tiled_mlp=4", "model.lora=true", "model.lora_dropout=0.1"],
     "model.tiled_mlp: expected 0 with model.lora_dropout=0.1"),
    (["model.offload_activations=true"], "model.offload_activations: expected false without "
                                         "model.gradient_checkpointing=true"),
    (["model.tiled_mlp=-1"], "model.tiled_mlp: expected an integer >= 0"),
    (["train.sequence_parallel=0"], "train.sequence_parallel: expected an integer >= 1"),
])
def test_long_row_settings_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)
