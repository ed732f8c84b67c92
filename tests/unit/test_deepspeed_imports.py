"""What a rank's start skips of DeepSpeed's imports: MLflow (imported by its autotuner) and the
torch.compile decoration of its Muon kernels (imported by every ZeRO optimizer). Each check runs in a
fresh interpreter, where nothing is imported yet."""

import subprocess
import sys

import pytest


def run(code: str) -> list[str]:
    """The lines the code prints that start with '>' (DeepSpeed prints to stdout too)."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [line for line in proc.stdout.splitlines() if line.startswith(">")]


def test_deepspeed_is_imported_without_mlflow_and_mlflow_imports_after():
    pytest.importorskip("mlflow")  # the trackers extra: without it there is nothing to skip
    assert run("import sys\n"
               "from dft_ds.deepspeed_setup import import_deepspeed\n"
               "ds = import_deepspeed()\n"
               "from deepspeed.autotuning import autotuner\n"
               "print('>', ds.__name__, 'mlflow' in sys.modules, autotuner.has_mlflow)\n"
               "import mlflow\n"
               "print('>', mlflow.__name__, hasattr(mlflow, 'start_run'))\n") == [
        "> deepspeed False False", "> mlflow True"]


def test_muon_is_imported_with_eager_kernels_unless_the_run_uses_muon():
    code = ("import sys\n"
            "from dft_ds.deepspeed_setup import import_deepspeed, import_muon_eager\n"
            "import_deepspeed()\n"
            "import_muon_eager({'optimizer': {'type': OPTIMIZER}})\n"
            "from deepspeed.runtime import compiler\n"
            "print('>', 'deepspeed.runtime.zero.muon.muon_optimizer' in sys.modules, 'torch._dynamo' in sys.modules,"
            " compiler.compile() is not compiler.dummy_decorator)\n"
            "if 'deepspeed.runtime.zero.muon.original_muon' in sys.modules:\n"
            "    from deepspeed.runtime.zero.muon import original_muon\n"
            "    print('>', type(original_muon.zeropower_via_newtonschulz5).__name__)\n")
    # Imported, the kernels plain functions, torch's compiler never loaded; compile() itself restored.
    assert run(code.replace("OPTIMIZER", "'AdamW'")) == ["> True False True", "> function"]
    # A run on Muon: nothing imported here, so DeepSpeed imports it compiled as it would anyway.
    assert run(code.replace("OPTIMIZER", "'Muon'")) == ["> False False True"]


def test_the_session_and_every_process_it_starts_use_the_venvs_ninja():
    """tests/conftest.py puts the venv's bin first on PATH: DeepSpeed's CPU comm op is JIT-built with the
    first ninja on PATH, and a switch between two ninja versions rebuilt it (about 30 s) each time."""
    import os
    import shutil

    venv_ninja = os.path.join(os.path.dirname(sys.executable), "ninja")
    if not os.path.exists(venv_ninja):
        pytest.skip("no ninja in this environment's bin (DeepSpeed's requirement installs one)")
    assert shutil.which("ninja") == venv_ninja
    assert run("import shutil; print('>', shutil.which('ninja'))") == [f"> {venv_ninja}"]


def test_the_cpu_accelerator_reads_the_numa_layout_once_per_process():
    # DeepSpeed runs `numactl --hardware` on every device_count() of its CPU accelerator; ZeRO-3 asks at
    # every gradient bucket. After import_deepspeed the first answer is kept, and it is the same answer.
    assert run("import os, subprocess\n"
               "os.environ.pop('LOCAL_SIZE', None)\n"
               "from dft_ds.deepspeed_setup import import_deepspeed\n"
               "import_deepspeed()\n"
               "from deepspeed.utils import numa\n"
               "from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator\n"
               "calls = []\n"
               "real = subprocess.check_output\n"
               "def counted(*args, **kwargs):\n"
               "    calls.append(args[0])\n"
               "    return real(*args, **kwargs)\n"
               "subprocess.check_output = counted\n"
               "counts = [CPU_Accelerator().device_count() for _ in range(5)]\n"
               "first = numa.get_numa_cores()\n"
               "first.append([99])\n"
               "print('>', len(set(counts)), counts[0] >= 1, len(calls) <= 1, numa.get_numa_cores() != first)\n"
               ) == ["> 1 True True True"]


def test_each_environment_builds_deepspeed_s_ops_in_its_own_folder(tmp_path, monkeypatch):
    """Two environments sharing ~/.cache/torch_extensions/py311_cpu rebuilt the CPU comm op over each
    other on every start (another torch, another ninja)."""
    import os
    import sys

    from dft_ds import deepspeed_setup as dss

    env = {"PATH": "/usr/bin"}
    assert dss.own_extensions_dir(env) == os.path.join(sys.prefix, "torch_extensions") == env["TORCH_EXTENSIONS_DIR"]
    own_bin = os.path.dirname(sys.executable)
    if os.path.exists(os.path.join(own_bin, "ninja")):  # the ninja that built the op builds it again
        assert env["PATH"] == own_bin + os.pathsep + "/usr/bin"
    assert dss.own_extensions_dir({"TORCH_EXTENSIONS_DIR": "/mine"}) == "/mine"  # the user's choice wins
    # an environment that cannot be written (a shared conda install): a folder of its own in the user's cache
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "opt" / "envs" / "shared"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    folder = dss.own_extensions_dir({"PATH": ""})
    assert os.path.dirname(folder) == str(tmp_path / "home" / ".cache" / "dft_ds" / "torch_extensions")
    assert os.path.basename(folder).startswith("shared-")
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "opt" / "envs" / "other"))
    assert dss.own_extensions_dir({"PATH": ""}) != folder


def test_a_start_knows_whether_the_cpu_comm_op_is_built(tmp_path):
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

    from dft_ds.deepspeed_setup import CPU_COMM_OP, cpu_comm_op_built

    assert CPU_COMM_OP == ShareMemCommBuilder.NAME
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path)}
    assert not cpu_comm_op_built(env)
    (tmp_path / CPU_COMM_OP).mkdir()
    (tmp_path / CPU_COMM_OP / f"{CPU_COMM_OP}.so").write_bytes(b"")
    assert cpu_comm_op_built(env)
