"""Starting real multi-process runs from tests: the venv's launchers, a clean environment, a port."""

import json
import os
import subprocess
import sys
from typing import Optional

from dft_ds.net import free_port  # noqa: F401  (tests import it from here)

BIN = os.path.dirname(sys.executable)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Small and quick: a couple of hundred problems, short rows, a dozen steps. No training-curves plot
# (matplotlib, about 0.75 s of CPU at each run's end); tests/e2e/test_logging.py tests the plot.
QUICK = ["data.synthetic_size=300", "data.max_length=192", "train.micro_batch_size=2",
         "logging.progress_bar=false", "logging.plot=false"]
# A smaller shape of the embedded default for the tiers that test control flow (faults, locks,
# resume, launchers), not numerics: each step costs about half the default's.
SMALL = ["model.config_overrides=hidden_size=64,num_hidden_layers=2,num_attention_heads=2,num_key_value_heads=2,"
         "intermediate_size=128"]
# For a run that must stay alive a while (to be signalled, locked, started beside): each step first
# waits idle (dft_ds/faults.py pace_step), where more steps would keep a core busy.
PACED = {"DFT_DS_FAULT_STEP_SLEEP": "0.3"}


def asset_cache(tmp_path) -> str:
    """The session's asset cache (tests/conftest.py: the tokenizer built once), else one under tmp_path."""
    return os.environ.get("DFT_DS_TEST_CACHE") or str(tmp_path / "cache")


def clean_env(tmp_path) -> dict:
    """No inherited rank variables; the session's asset cache for the tokenizer; no hub access."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith("SLURM_")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               DFT_DS_CACHE=asset_cache(tmp_path), PYTHONUNBUFFERED="1")
    # DeepSpeed JIT-builds a small CPU comm op; one build per venv, not one per checkout sharing ~/.cache.
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    return env


def run(cmd: list[str], env: dict, timeout: int = 600, cwd: str = REPO) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    return proc


def read_metrics(out_dir) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "grad_probe.py")


def run_probes(tmp_path, ranks: int, probes: dict, rows: Optional[dict] = None, timeout: int = 900) -> dict:
    """One torchrun launch of grad_probe.py over several probes: {name: overrides} -> {name: result}.

    Each probe is one optimizer step of the real trainer with its full gradient (grad_probe.main);
    `rows` gives a probe its DFT_PROBE_ROWS. One launch pays the start-up (interpreter, imports,
    rendezvous) once for all of them."""
    spec = [{"out": str(tmp_path / f"grad-{name}.pt"), "overrides": list(overrides), "rows": (rows or {}).get(name)}
            for name, overrides in probes.items()]
    spec_path = tmp_path / f"probes-{ranks}-{len(os.listdir(tmp_path))}.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}", f"--master-port={free_port()}",
           PROBE, "--many", str(spec_path)]
    proc = run(cmd, clean_env(tmp_path), timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-6000:]
    import torch

    return {name: torch.load(item["out"]) for name, item in zip(probes, spec)}


def fused_and_full(tmp_path, ranks: int, cases: dict) -> dict:
    """run_probes over every case twice, loss.fused=true and =false: {case: overrides} ->
    {(case, "fused" or "full"): result}, in one launch."""
    ways = {"fused": "true", "full": "false"}
    got = run_probes(tmp_path, ranks, {f"{case}-{way}": [*overrides, f"loss.fused={flag}"]
                                       for case, overrides in cases.items() for way, flag in ways.items()})
    return {(case, way): got[f"{case}-{way}"] for case in cases for way in ways}
