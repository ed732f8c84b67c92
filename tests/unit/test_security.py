"""Hostile input (docs/faults.md, "Hostile input"): what dft_ds unpickles, where a shell could read a
user's value, and what it writes outside the places a user named.

The source scans pin what the audit found, so that a new torch.load without weights_only, or a new
shell, fails here instead of going unnoticed.
"""

import ast
import os
import sys
from pathlib import Path

import pytest

from dft_ds import launch
from dft_ds.errors import EXIT_BAD_INPUT, UserError

REPO = Path(__file__).resolve().parents[2]
SOURCES = sorted((REPO / "dft_ds").rglob("*.py")) + [REPO / "launcher" / "dft-launch"]


def calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Call):
            yield node


def dotted(func: ast.expr) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else kw.value
    return None


def test_every_torch_load_of_ours_is_weights_only():
    found = []
    for path in SOURCES:
        for call in calls(path):
            name = dotted(call.func)
            where = f"{path.relative_to(REPO)}:{call.lineno}"
            if name == "torch.load":
                assert keyword(call, "weights_only") is True, f"{where}: torch.load without weights_only=True"
                found.append(where)
            assert name not in ("pickle.load", "pickle.loads", "dill.load", "joblib.load"), f"{where}: {name}"
            assert keyword(call, "allow_pickle") is not True, f"{where}: allow_pickle=True"
    assert found, "the RNG states are read with torch.load(weights_only=True); the scan found none"


def test_no_shell_in_the_package_or_the_launcher():
    for path in SOURCES:
        for call in calls(path):
            where = f"{path.relative_to(REPO)}:{call.lineno}"
            assert keyword(call, "shell") is not True, f"{where}: shell=True"
            assert dotted(call.func) not in ("os.system", "os.popen", "subprocess.getoutput",
                                             "subprocess.getstatusoutput"), f"{where}: {dotted(call.func)}"


# --------------------------------------------------------------------------------------------
# dft-launch --via deepspeed over ssh: deepspeed's pdsh runner hands one command line to a shell


@pytest.fixture
def two_hosts(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("w-a slots=2\nw-b slots=2\n")
    return ["--via", "deepspeed", "--hostfile", str(hostfile), "--master-port", "29500"]


def no_slurm_env() -> dict:
    return {k: v for k, v in os.environ.items()
            if not k.startswith("SLURM_") and k not in ("MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE")}


@pytest.mark.parametrize("arg, bad", [("train.output_dir=$(touch /tmp/pwned)", "$()"),
                                      ("train.output_dir=/runs/`id`", "`"), ("a;b", ";"),
                                      ("train.output_dir=/runs/%n", "%"), ("data.source=it's.jsonl", "'"),
                                      ('train.output_dir=/runs/a "b"', '"')])
def test_a_value_the_remote_shell_would_read_is_refused_before_anything_runs(two_hosts, arg, bad):
    ns = launch.parse_args([*two_hosts, "my.yaml", arg])
    with pytest.raises(UserError) as refused:
        launch.make_launch_spec(ns, no_slurm_env())
    message = str(refused.value)
    assert f"the argument {arg!r} holds {bad!r}" in message
    assert "config file" in message and "--node-rank" in message and "--via srun" in message


def test_the_master_address_is_checked_too(two_hosts):
    with pytest.raises(UserError, match=r"the master address '10.0.0.1;id' holds ';'"):
        launch.make_launch_spec(launch.parse_args([*two_hosts, "--master-addr", "10.0.0.1;id"]), no_slurm_env())


def test_plain_values_pass_and_no_ssh_passes_anything_as_one_argument(two_hosts):
    plain = ["my.yaml", "train.output_dir=/runs/a b", "model.lora_targets=q_proj,v_proj", "train.lr=5e-5"]
    plan = launch.make_launch_spec(launch.parse_args([*two_hosts, *plain]), no_slurm_env())
    assert plan.node_rank is None and plan.command[-len(plain):] == plain
    # Per node (--no_ssh) deepspeed starts the ranks from an argument list: no shell, nothing to refuse.
    odd = "train.output_dir=/runs/$(id);`x`"
    plan = launch.make_launch_spec(launch.parse_args([*two_hosts, "--node-rank", "1", odd]), no_slurm_env())
    assert "--no_ssh" in plan.command and plan.command[-1] == odd


def test_dft_launch_exits_2_and_names_the_argument(two_hosts, capsys, monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    for name in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    assert launch.main([*two_hosts, "--dry-run", "x=$(id)"]) == EXIT_BAD_INPUT
    assert "the argument 'x=$(id)' holds '$()'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Writes outside the places a user named


def test_vllm_backend_turns_off_usage_stats_unless_the_user_set_them(monkeypatch):
    from dft_ds.eval.generate import VLLMBackend

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` fails: nothing else starts
    monkeypatch.delenv("VLLM_NO_USAGE_STATS", raising=False)
    with pytest.raises(UserError, match="vllm cannot be imported"):
        VLLMBackend("unused")
    assert os.environ["VLLM_NO_USAGE_STATS"] == "1"
    monkeypatch.setenv("VLLM_NO_USAGE_STATS", "0")
    with pytest.raises(UserError):
        VLLMBackend("unused")
    assert os.environ["VLLM_NO_USAGE_STATS"] == "0"
