"""Hub names on a machine without network: one probe, no retries, one message naming every key that
cannot be loaded, and cached names that load at once. The Hub is stood in for by a closed loopback
port (HF_ENDPOINT); the cache is a real Hugging Face cache layout read by huggingface_hub itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from dft_ds.config import load_config
from dft_ds.errors import UserError
from dft_ds.hub import check_hub_names, is_cached, looks_like_hub_name
from dft_ds.net import free_port
from tests.distributed.helpers import clean_env

pytestmark = pytest.mark.slow


def no_network_env(tmp_path, offline: bool = False) -> dict:
    env = clean_env(tmp_path)
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("HF_DATASETS_OFFLINE", None)
    env.pop("TRANSFORMERS_OFFLINE", None)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there: refused at once
    env["HF_HOME"] = str(tmp_path / "hf_home")
    env.pop("HF_HUB_CACHE", None)
    env.pop("HF_DATASETS_CACHE", None)
    return env


def check(tmp_path, env, *overrides):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dft_ds.train", "--check", f"train.output_dir={out}", *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    return proc, out


def fill_cache(hf_home, repo_id: str, model_dir: str) -> None:
    """The layout huggingface_hub writes: refs/main names a snapshot folder holding the files."""
    repo = os.path.join(hf_home, "hub", "models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as fh:
        fh.write(commit)
    shutil.copytree(model_dir, os.path.join(repo, "snapshots", commit))


def test_unreachable_hub_names_every_missing_key_in_one_message_without_retries(tmp_path):
    proc, out = check(tmp_path, no_network_env(tmp_path), "model.name_or_path=Qwen/Qwen2.5-0.5B",
                      "data.source=AI-MO/NuminaMath-CoT")
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr
    assert "the Hugging Face Hub is out of reach (127.0.0.1:" in err and "does not answer" in err
    assert "model.name_or_path: 'Qwen/Qwen2.5-0.5B' is not in the local cache (model, and the tokenizer" in err
    assert "data.source: 'AI-MO/NuminaMath-CoT' is not in the local cache (dataset)" in err
    assert "hf download AI-MO/NuminaMath-CoT --repo-type dataset" in err and "HF_HUB_OFFLINE=1" in err
    assert "Retry" not in err and "model.tokenizer:" not in err and "Traceback" not in err
    assert err.count("dft-train: error:") == 1
    assert not out.exists()


def test_offline_mode_requested_is_named_as_the_reason(tmp_path):
    proc, _ = check(tmp_path, no_network_env(tmp_path, offline=True), "model.name_or_path=Qwen/Qwen2.5-0.5B")
    assert proc.returncode == 2
    assert "out of reach (offline mode is on: HF_HUB_OFFLINE=1)" in proc.stderr


def test_cached_model_loads_when_the_hub_is_unreachable(tmp_path, family_dir):
    env = no_network_env(tmp_path)
    fill_cache(env["HF_HOME"], "tiny-org/qwen2-tiny", family_dir("qwen2"))
    proc, out = check(tmp_path, env, "model.name_or_path=tiny-org/qwen2-tiny", "data.synthetic_size=64",
                      "data.max_length=128", "train.max_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "model: tiny-org/qwen2-tiny" in proc.stdout
    assert "Retry" not in proc.stderr


def test_a_missing_path_that_is_not_owner_name_is_never_sent_to_the_hub(tmp_path):
    proc, _ = check(tmp_path, no_network_env(tmp_path), "data.source=mydata", "model.tokenizer=tok")
    assert proc.returncode == 2
    assert "data.source: 'mydata' does not exist here, and it is not a hub name (those look like owner/name)" \
        in proc.stderr
    assert "model.tokenizer: 'tok' does not exist here" in proc.stderr
    assert "out of reach" not in proc.stderr  # no probe was needed for names that are not hub names


def test_hub_name_rule():
    assert looks_like_hub_name("Qwen/Qwen2.5-Math-1.5B") and looks_like_hub_name("AI-MO/NuminaMath-CoT")
    for name in ("mydata", "./data/x", "/abs/path", "~/x", "a/b/c", "data/train.jsonl", ".hidden/x"):
        assert not looks_like_hub_name(name), name


def test_probe_is_not_asked_when_nothing_needs_the_hub(tmp_path):
    asked = []
    check_hub_names(load_config(None, [f"train.output_dir={tmp_path}/o"]), probe=lambda: asked.append(1))
    assert asked == []


def test_probe_answer_online_lets_names_through(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # restored afterwards, whatever the code sets
    asked = []
    # Neither name is cached: online, that is no error (the libraries download them), and nothing goes offline.
    check_hub_names(load_config(None, ["model.name_or_path=org/model", "data.source=org/data"]),
                    probe=lambda: asked.append(1))
    assert asked == [1]  # one probe for both names
    assert "HF_HUB_OFFLINE" not in os.environ and constants.HF_HUB_OFFLINE is False


def test_is_cached_reads_the_cache_layout(tmp_path, monkeypatch, family_dir):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert not is_cached("tiny-org/m", "model")
    fill_cache(str(tmp_path), "tiny-org/m", family_dir("qwen2"))
    assert is_cached("tiny-org/m", "model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config(None, ["model.name_or_path=tiny-org/absent"])
    with pytest.raises(UserError, match=r"model.name_or_path: 'tiny-org/absent' is not in the local cache"):
        check_hub_names(cfg)


def test_a_mistyped_local_path_names_its_nearest_match_and_is_never_sent_to_the_hub(tmp_path, monkeypatch):
    """`models/tiny-qwen` beside `models/tiny-qwen2` looks like owner/name, but its folder is here."""
    (tmp_path / "models" / "tiny-qwen2").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    monkeypatch.chdir(tmp_path)
    asked = []
    with pytest.raises(UserError) as info:
        check_hub_names(load_config(None, ["model.name_or_path=models/tiny-qwen", "data.source=data/trian.jsonl",
                                           "data.eval_source=data/held_out"]), probe=lambda: asked.append(1))
    message = str(info.value)
    assert asked == [] and "hf download" not in message
    assert ("model.name_or_path: 'models/tiny-qwen' does not exist here; its folder 'models' does, so it is read as "
            "a local path, not a hub name; the nearest there is 'models/tiny-qwen2'") in message
    assert ("data.source: 'data/trian.jsonl' does not exist here, and it is not a hub name (those look like "
            "owner/name); the nearest there is 'data/train.jsonl'") in message
    assert "data.eval_source: 'data/held_out' does not exist here; its folder 'data' does" in message
    assert "'data' holds train.jsonl" in message
