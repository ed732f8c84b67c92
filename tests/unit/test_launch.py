"""dft-launch: the commands it builds (1 and 4 nodes, Slurm or not, each launcher), the environment it
adds, argument passing without a shell, exit codes and signals.

Slurm is simulated with SLURM_* variables and a fake `scontrol` on PATH; the training is replaced
by a tiny module (DFT_LAUNCH_TRAIN_MODULE) where a test is about the launcher, not the training.
Tests marked slow start the real torchrun or deepspeed launcher.
"""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from dft_ds import launch
from dft_ds.errors import EXIT_BAD_INPUT, EXIT_PREEMPTED, UserError, report_exit_code
from tests.distributed.helpers import asset_cache

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCHER = os.path.join(REPO, "launcher", "dft-launch")
HOSTS = ["n001", "n002", "n003", "n004"]
JOB_ID = "123456"
SLURM_PORT = 20000 + 123456 % 20000


def write_script(path, body: str) -> str:
    path.write_text("#!" + sys.executable + "\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def fakebin(tmp_path):
    """A PATH directory with a fake `scontrol` that expands any node list to n001..n004."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    write_script(bindir / "scontrol", f"""\
        import sys
        assert sys.argv[1:3] == ["show", "hostnames"], sys.argv
        print("\\n".join({HOSTS!r}))
        """)
    return bindir


def base_env(fakebin=None, **extra) -> dict:
    """No Slurm, no rank variables, no GPUs; only what the test adds."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                       "MASTER_PORT", "NPROC_PER_NODE", "GLOO_SOCKET_IFNAME",
                                                       "NCCL_SOCKET_IFNAME", "TORCHELASTIC_ERROR_FILE",
                                                       launch.TRAIN_MODULE_ENV)}
    env["CUDA_VISIBLE_DEVICES"] = ""
    if fakebin is not None:
        env["PATH"] = f"{fakebin}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def slurm_env(fakebin, node_id=0, in_task=True, **extra) -> dict:
    env = base_env(fakebin, SLURM_JOB_ID=JOB_ID, SLURM_JOB_NODELIST="n[001-004]", SLURM_NNODES="4",
                   SLURM_NODEID=str(node_id))
    if in_task:
        env.update(SLURM_STEP_ID="0", SLURM_STEP_NODELIST="n[001-004]")
    env.update(extra)
    return env


def plan_for(argv, env) -> launch.LaunchSpec:
    return launch.make_launch_spec(launch.parse_args(argv), env)


def flag(cmd, name) -> str:
    return cmd[cmd.index(name) + 1]


# --------------------------------------------------------------------------------------------
# Commands


def test_single_node_default_is_torchrun_on_a_free_loopback_port():
    plan = plan_for(["cfg.yaml", "train.lr=1e-5"], base_env())
    assert plan.via == "torchrun" and plan.nnodes == 1 and plan.nproc_per_node == 1 and plan.node_rank == 0
    port = plan.master_port
    assert 0 < port < 65536
    assert plan.command == [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--node-rank", "0",
                            "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
                            "-m", "dft_ds.train", "cfg.yaml", "train.lr=1e-5"]
    assert plan.env == {}  # loopback: no interface to choose
    assert plan.node_commands == [(0, plan.command)]


def test_nproc_per_node_from_env_then_gpus_then_one(fakebin, tmp_path):
    assert plan_for([], base_env(NPROC_PER_NODE="5")).nproc_per_node == 5
    assert plan_for([], base_env(CUDA_VISIBLE_DEVICES="0,1,2")).nproc_per_node == 3
    assert plan_for(["--nproc-per-node", "2"], base_env(NPROC_PER_NODE="5")).nproc_per_node == 2
    write_script(fakebin / "nvidia-smi", """\
        print("GPU 0: NVIDIA H100 (UUID: GPU-1)")
        print("  MIG 1g.10gb Device 0: (UUID: MIG-1)")
        print("GPU 1: NVIDIA H100 (UUID: GPU-2)")
        """)
    env = base_env(fakebin)
    del env["CUDA_VISIBLE_DEVICES"]
    assert plan_for([], env).nproc_per_node == 2
    assert plan_for([], base_env(CUDA_VISIBLE_DEVICES="-1")).nproc_per_node == 1


@pytest.mark.parametrize("via", ["torchrun", "deepspeed"])
def test_four_nodes_in_slurm_agree_on_master_and_port_with_distinct_ranks(fakebin, via):
    """Each node computes its own plan from its own task environment: one master, one port, ranks 0..3."""
    plans = [plan_for(["--via", via, "--nproc-per-node", "2", "cfg.yaml"], slurm_env(fakebin, node_id=n))
             for n in range(4)]
    assert [p.node_rank for p in plans] == [0, 1, 2, 3]
    assert {p.master_addr for p in plans} == {"n001"}
    assert {p.master_port for p in plans} == {SLURM_PORT}
    for n, plan in enumerate(plans):
        # What each node runs is what node 0 would print for it.
        assert plan.command == plans[0].node_commands[n][1]
        rank_flag = "--node-rank" if via == "torchrun" else "--node_rank"
        assert flag(plan.command, rank_flag) == str(n)
    assert [r for r, _ in plans[0].node_commands] == [0, 1, 2, 3]


def test_torchrun_shape_for_four_nodes(fakebin):
    plan = plan_for(["--nproc-per-node", "8", "cfg.yaml", "x=1"], slurm_env(fakebin, node_id=3))
    assert plan.via == "torchrun"  # inside a task, not the batch shell
    assert plan.command == [sys.executable, "-m", "torch.distributed.run", "--nnodes", "4", "--node-rank", "3",
                            "--nproc-per-node", "8", "--master-addr", "n001", "--master-port", str(SLURM_PORT),
                            "-m", "dft_ds.train", "cfg.yaml", "x=1"]


def test_deepspeed_shape_and_generated_hostfile_in_slurm(fakebin):
    plan = plan_for(["--via", "deepspeed", "--nproc-per-node", "2", "x=1"], slurm_env(fakebin, node_id=1))
    cmd = plan.command
    assert os.path.basename(cmd[0]) == "deepspeed" or cmd[1:3] == ["-m", "deepspeed.launcher.runner"]
    assert flag(cmd, "--num_nodes") == "4" and flag(cmd, "--num_gpus") == "2"
    assert flag(cmd, "--master_addr") == "n001" and flag(cmd, "--master_port") == str(SLURM_PORT)
    assert flag(cmd, "--hostfile") == plan.hostfile
    assert "--no_ssh" in cmd and flag(cmd, "--node_rank") == "1"
    assert cmd[-3:] == ["--module", "dft_ds.train", "x=1"]
    assert plan.hostfile_text == "n001 slots=2\nn002 slots=2\nn003 slots=2\nn004 slots=2\n"


def test_deepspeed_in_the_batch_shell_fans_out_over_ssh(fakebin):
    plan = plan_for(["--via", "deepspeed", "--nproc-per-node", "2"], slurm_env(fakebin, in_task=False))
    assert plan.node_rank is None and "--no_ssh" not in plan.command and "--node_rank" not in plan.command
    assert plan.hostfile_text.splitlines()[0] == "n001 slots=2"
    assert plan.node_commands == [(None, plan.command)]


def test_deepspeed_outside_slurm_per_node_without_ssh():
    plan = plan_for(["--via", "deepspeed", "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.9.8.7",
                     "--master-port", "29501", "--nproc-per-node", "1"], base_env())
    assert plan.hostfile_text == "node0 slots=1\nnode1 slots=1\n"
    assert flag(plan.command, "--node_rank") == "1" and "--no_ssh" in plan.command
    single = plan_for(["--via", "deepspeed", "--nproc-per-node", "2"], base_env())
    assert single.hostfile is None and "--no_ssh" not in single.command
    assert flag(single.command, "--num_gpus") == "2" and flag(single.command, "--num_nodes") == "1"


def test_srun_is_the_default_in_the_batch_shell(fakebin):
    plan = plan_for(["--nproc-per-node", "4", "cfg.yaml"], slurm_env(fakebin, in_task=False))
    assert plan.via == "srun" and plan.node_rank is None
    assert plan.command == ["srun", "--nodes", "4", "--ntasks-per-node", "4", "--kill-on-bad-exit=1",
                            sys.executable, "-m", "dft_ds.train", "cfg.yaml"]
    assert plan.env["MASTER_ADDR"] == "n001" and plan.env["MASTER_PORT"] == str(SLURM_PORT)


def test_one_node_in_slurm_uses_loopback_except_through_srun(fakebin):
    plan = plan_for(["--nnodes", "1"], slurm_env(fakebin, node_id=3))
    assert plan.master_addr == "127.0.0.1" and plan.master_port != SLURM_PORT and plan.node_rank == 0
    plan = plan_for(["--nnodes", "1"], slurm_env(fakebin, in_task=False))
    assert plan.via == "srun" and plan.master_addr == "n001" and plan.master_port == SLURM_PORT


def test_user_hostfile_gives_nodes_and_master(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two workers\nw-a slots=8\nw-b slots=8\n")
    plan = plan_for(["--hostfile", str(hostfile), "--node-rank", "1", "--master-port", "29500"], base_env())
    assert plan.nnodes == 2 and plan.master_addr == "w-a"
    bad = tmp_path / "bad"
    bad.write_text("w-a slots=8\nw-b 8\n")
    with pytest.raises(UserError, match=r"bad:2: expected 'HOST slots=N'"):
        plan_for(["--hostfile", str(bad)], base_env())


@pytest.mark.parametrize("argv, env_extra, message", [
    (["--nnodes", "2"], {}, "needs this node's rank"),
    (["--nnodes", "2", "--node-rank", "1"], {}, "needs --master-addr"),
    (["--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1"], {}, "needs --master-port"),
    (["--nnodes", "2", "--node-rank", "2", "--master-addr", "a", "--master-port", "1"], {}, r"0 \.\. 1"),
    (["--via", "srun"], {}, "needs a Slurm allocation"),
    (["--nproc-per-node", "0"], {}, "at least 1"),
    ([], {"NPROC_PER_NODE": "two"}, "NPROC_PER_NODE"),
])
def test_contradictory_input_is_a_user_error(argv, env_extra, message):
    with pytest.raises(UserError, match=message):
        plan_for(argv, base_env(**env_extra))


def test_torchrun_in_the_batch_shell_of_a_multi_node_job_is_refused(fakebin):
    # Every node would read SLURM_NODEID=0 there: the batch shell runs on the first node only.
    with pytest.raises(UserError, match="srun --ntasks-per-node=1"):
        plan_for(["--via", "torchrun"], slurm_env(fakebin, in_task=False))


# --------------------------------------------------------------------------------------------
# Environment


def local_address():
    import ipaddress

    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family.name == "AF_INET" and not ipaddress.ip_address(a.address).is_loopback:
                return name, a.address
    pytest.skip("no non-loopback IPv4 address on this machine")


def test_interface_is_the_one_carrying_the_master_address():
    name, address = local_address()
    assert launch.interface_for(address) == name
    assert launch.interface_for("127.0.0.1") is None
    assert launch.interface_for("no-such-host.invalid") is None


def test_socket_interface_set_only_where_the_user_has_not():
    name, address = local_address()
    argv = ["--nnodes", "2", "--node-rank", "0", "--master-port", "29500"]
    plan = plan_for(argv + ["--master-addr", address], base_env())
    assert plan.env == {"GLOO_SOCKET_IFNAME": name, "NCCL_SOCKET_IFNAME": name}
    plan = plan_for(argv + ["--master-addr", address], base_env(GLOO_SOCKET_IFNAME="mine"))
    assert plan.env == {"NCCL_SOCKET_IFNAME": name}
    # MASTER_ADDR/MASTER_PORT from the environment are defaults too.
    plan = plan_for(["--nnodes", "2", "--node-rank", "1"], base_env(MASTER_ADDR=address, MASTER_PORT="29999"))
    assert plan.master_addr == address and plan.master_port == 29999
    assert plan_for([], base_env()).env == {}  # one node: nothing to choose


# --------------------------------------------------------------------------------------------
# The CLI, end to end with fakes: dry run, argv without a shell, exit codes, signals


def cli(args, env, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, LAUNCHER, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_dry_run_prints_one_command_per_node(fakebin):
    proc = cli(["--dry-run", "--nproc-per-node", "2", "train.lr=1e-5"], slurm_env(fakebin, node_id=2))
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("node ")]
    assert [line.split(":", 1)[0] for line in lines] == ["node 0", "node 1", "node 2", "node 3"]
    cmds = [shlex.split(line.split(": ", 1)[1]) for line in lines]
    assert [flag(c, "--node-rank") for c in cmds] == ["0", "1", "2", "3"]
    assert {flag(c, "--master-addr") for c in cmds} == {"n001"}
    assert {flag(c, "--master-port") for c in cmds} == {str(SLURM_PORT)}
    assert "this is node 2" in proc.stdout


def test_dry_run_single_node_and_bad_option_exit_codes():
    proc = cli(["--dry-run", "--nproc-per-node", "2"], base_env())
    assert proc.returncode == 0 and proc.stdout.count("\nnode 0: ") == 1, proc.stdout
    proc = cli(["--dry-run", "--nnodes", "3"], base_env())
    assert proc.returncode == EXIT_BAD_INPUT
    assert "dft-launch: error: --nnodes 3 with --via torchrun needs this node's rank: pass --node-rank" in proc.stderr
    proc = cli(["--via", "mpi"], base_env())
    assert proc.returncode == EXIT_BAD_INPUT
    assert "--via: invalid choice: 'mpi'" in proc.stderr  # argparse's words; the choices' quoting varies by Python
    assert all(choice in proc.stderr.split("invalid choice")[1] for choice in ("torchrun", "deepspeed", "srun"))


def test_help_documents_every_option():
    text = launch.build_parser().format_help()
    for action in launch.build_parser()._actions:
        for option in action.option_strings:
            assert option in text
        assert action.help
    for word in ("NPROC_PER_NODE", "SLURM_NODEID", "GLOO_SOCKET_IFNAME", "SIGUSR1", "75"):
        assert word in text


FAKE_TRAIN = """\
import json, os, signal, sys, time
out = os.environ["FAKE_OUT"]
# Install the stop handler late, like the real training after its imports.
time.sleep(float(os.environ.get("FAKE_DELAY", "0")))
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
env = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")}
with open(out + ".argv", "w") as fh:
    json.dump({"argv": sys.argv[1:], "env": env}, fh)
if os.environ.get("FAKE_WAIT_SIGNAL"):
    open(out + ".ready", "w").close()
    deadline = time.time() + 30
    while not got and time.time() < deadline:
        time.sleep(0.05)
    with open(out + ".signals", "w") as fh:
        json.dump(got, fh)
code = int(os.environ.get("FAKE_EXIT", "0"))
if os.environ.get("FAKE_REPORT"):
    from dft_ds.errors import report_exit_code
    report_exit_code(code, "fake training stopped")
sys.exit(code)
"""


@pytest.fixture
def fake_slurm(tmp_path, fakebin):
    """A fake `srun` (runs its command once, here) and a fake training module; the env to use them."""
    (tmp_path / "fake_train.py").write_text(FAKE_TRAIN)
    write_script(fakebin / "srun", """\
        import os, sys
        args = sys.argv[1:]
        while args[0].startswith("-"):
            args = args[1:] if "=" in args[0] else args[2:]
        os.execv(args[0], args)
        """)
    out = str(tmp_path / "fake")
    env = slurm_env(fakebin, in_task=False, PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}", FAKE_OUT=out)
    env[launch.TRAIN_MODULE_ENV] = "fake_train"
    return env, out


WEIRD = ["train.output_dir=/tmp/a b", "data.template=it's \"quoted\"; rm -rf / $(echo x) `id` | cat", "x=*", ""]


def test_arguments_pass_through_as_single_argv_entries(fake_slurm):
    env, out = fake_slurm
    env["GLOO_SOCKET_IFNAME"] = "users-own"
    proc = cli(["--nproc-per-node", "1", "--", *WEIRD], env)
    assert proc.returncode == 0, proc.stderr
    seen = json.load(open(out + ".argv"))
    assert seen["argv"] == WEIRD
    assert seen["env"]["MASTER_ADDR"] == "n001" and seen["env"]["MASTER_PORT"] == str(SLURM_PORT)
    assert seen["env"]["GLOO_SOCKET_IFNAME"] == "users-own"


@pytest.mark.parametrize("code", [EXIT_PREEMPTED, EXIT_BAD_INPUT, 1, 0])
def test_exit_code_of_the_training_is_dft_launch_s(fake_slurm, code):
    env, out = fake_slurm
    env["FAKE_EXIT"] = str(code)
    proc = cli(["x=1"], env)
    assert proc.returncode == code, proc.stderr
    # The training ran and its code was passed on: not dft-launch refusing (2), crashing (1) or never starting (0).
    assert json.load(open(out + ".argv"))["argv"] == ["x=1"]
    assert "dft-launch: error:" not in proc.stderr and "Traceback" not in proc.stderr


def test_sigusr1_to_dft_launch_reaches_srun_and_the_training_exits_75(fake_slurm):
    env, out = fake_slurm
    env.update(FAKE_WAIT_SIGNAL="1", FAKE_EXIT=str(EXIT_PREEMPTED))
    proc = subprocess.Popen([sys.executable, LAUNCHER, "x=1"], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for(out + ".ready", proc)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=30) == EXIT_PREEMPTED
    assert json.load(open(out + ".signals")) == [signal.SIGUSR1]


def wait_for(path, proc, timeout=30):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, f"exited early with {proc.returncode}"
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_signal_goes_to_the_ranks_not_the_launcher_and_waits_for_their_handler(fake_slurm, tmp_path):
    """A launcher between dft-launch and the rank dies of SIGUSR1 if signalled; the rank must get it, and
    only once its handler is installed (here 1 s after start; the signal is sent before that)."""
    env, out = fake_slurm
    env.update(FAKE_WAIT_SIGNAL="1", FAKE_EXIT=str(EXIT_PREEMPTED), FAKE_DELAY="1")
    fake_launcher = "import subprocess, sys; sys.exit(subprocess.call([sys.executable, '-u', '-m', 'fake_train']))"
    driver = ("import sys; from dft_ds.launch import execute; "
              f"sys.exit(execute([sys.executable, '-c', {fake_launcher!r}], None, module='fake_train', log=print))")
    proc = subprocess.Popen([sys.executable, "-c", driver], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    time.sleep(0.5)  # the launcher runs, the rank sleeps before installing its handler
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_PREEMPTED, output
    assert json.load(open(out + ".signals")) == [signal.SIGUSR1]
    assert output.count("passed SIGUSR1 to rank") == 1


def test_runs_module_tells_ranks_from_launchers():
    py = sys.executable
    assert launch.runs_module([py, "-u", "-m", "dft_ds.train", "--local_rank=0", "x=1"], "dft_ds.train")
    assert launch.runs_module([py, "-X", "dev", "-mdft_ds.train"], "dft_ds.train")
    assert not launch.runs_module([py, "-m", "torch.distributed.run", "-m", "dft_ds.train"], "dft_ds.train")
    assert not launch.runs_module([py, "-u", "-m", "deepspeed.launcher.launch", "--module", "dft_ds.train"],
                                  "dft_ds.train")
    assert not launch.runs_module([py, "/venv/bin/deepspeed", "--module", "dft_ds.train"], "dft_ds.train")
    assert not launch.runs_module([py, "-c", "-m dft_ds.train"], "dft_ds.train")


def test_torchrun_error_file_gives_the_rank_exit_code(tmp_path, monkeypatch):
    rank_file = tmp_path / "rank-error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(rank_file))
    report_exit_code(EXIT_PREEMPTED, "stopped")
    data = json.load(open(rank_file))
    # torchrun copies the first failed rank's file and writes its real exit code into it.
    data["message"]["errorCode"] = EXIT_PREEMPTED
    agent_file = tmp_path / "agent.json"
    agent_file.write_text(json.dumps(data))
    assert launch.torchrun_error_code(str(agent_file)) == EXIT_PREEMPTED
    assert launch.torchrun_error_code(str(tmp_path / "missing.json")) is None
    assert launch.exit_status(-signal.SIGTERM) == 128 + signal.SIGTERM


# --------------------------------------------------------------------------------------------
# Real launchers (slow): exit codes through torchrun and deepspeed


@pytest.mark.slow
def test_exit_75_comes_back_through_real_torchrun(fake_slurm):
    """torchrun turns every failure into exit 1; the rank's error file carries the real code back."""
    env, out = fake_slurm
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    env.update(FAKE_EXIT=str(EXIT_PREEMPTED), FAKE_REPORT="1")
    proc = cli(["--via", "torchrun", "--nproc-per-node", "2", "--", *WEIRD], env, timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert json.load(open(out + ".argv"))["argv"] == WEIRD


@pytest.mark.slow
def test_bad_override_exits_2_through_real_deepspeed(tmp_path):
    env = base_env(HF_HUB_OFFLINE="1", DFT_DS_CACHE=asset_cache(tmp_path))
    proc = cli(["--via", "deepspeed", "--nproc-per-node", "1", "train.no_such_key=1",
                f"train.output_dir={tmp_path / 'run'}"], env, timeout=300)
    assert proc.returncode == EXIT_BAD_INPUT, proc.stdout[-2000:] + proc.stderr[-3000:]
    # The message of dft-train's own check (the launcher's echo of the command names the key too).
    assert "unknown key 'train.no_such_key'" in proc.stderr + proc.stdout
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_sigusr1_to_dft_launch_checkpoints_real_training_through_deepspeed(tmp_path):
    """The real launcher and trainer: the ranks (not the launcher) get the signal, save, and 75 comes back."""
    out = tmp_path / "run"
    env = base_env(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", DFT_DS_CACHE=asset_cache(tmp_path),
                   OMP_NUM_THREADS="1")
    args = ["--via", "deepspeed", "--nproc-per-node", "2", "data.synthetic_size=300", "data.max_length=192",
            "train.micro_batch_size=2", "logging.progress_bar=false", "train.max_steps=500", f"train.output_dir={out}"]
    log = tmp_path / "launch.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, LAUNCHER, *args], env=env, cwd=REPO, stdout=fh,
                                stderr=subprocess.STDOUT)
    try:
        wait_for(str(out / "metrics.jsonl"), proc, timeout=300)
        proc.send_signal(signal.SIGUSR1)
        code = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert code == EXIT_PREEMPTED, text[-4000:]
    assert text.count("passed SIGUSR1 to rank") == 2 and "stopped at step" in text
    tag = (out / "checkpoints" / "latest").read_text().strip()
    assert len(list((out / "checkpoints" / tag).glob("*model_states.pt"))) == 2


# --------------------------------------------------------------------------------------------
# Options after the config: taken if dft-launch's or dft-train's own, refused by name otherwise


def test_launcher_options_are_taken_after_the_config_too(fake_slurm):
    env, out = fake_slurm
    proc = cli(["configs/tiny.yaml", "--nproc-per-node", "1", "x=1", "--via=srun", "y=2"], env)
    assert proc.returncode == 0, proc.stderr
    assert json.load(open(out + ".argv"))["argv"] == ["configs/tiny.yaml", "x=1", "y=2"]  # the options stayed here
    plan = plan_for(["cfg.yaml", "--nproc", "3", "x=1", "--check", "--world-size", "8"], base_env())
    assert plan.nproc_per_node == 3  # a unique prefix, as argparse takes one before the config
    assert plan.train_args == ["cfg.yaml", "x=1", "--check", "--world-size", "8"]  # dft-train's own pass on


@pytest.mark.parametrize("argv, message", [
    (["--nproc", "2", "configs/tiny.yaml", "--nodes", "2"], "unknown option --nodes (did you mean --nnodes?)"),
    (["--nproc", "2", "configs/tiny.yaml", "--bogus"], "unknown option --bogus. "),
    (["configs/tiny.yaml", "--n", "2"], "option --n is ambiguous: it could be --nnodes, --node-rank, --nproc-per-node"),
])
def test_an_unknown_option_anywhere_exits_2_named_before_anything_runs(fake_slurm, argv, message):
    # It used to go to every rank, which each refused it after start-up with dft-train's usage.
    env, out = fake_slurm
    proc = cli(argv, env)
    assert proc.returncode == EXIT_BAD_INPUT
    assert f"dft-launch: error: {message}" in proc.stderr
    if "unknown" in message:
        assert "may stand before or after the config" in proc.stderr and "after `--`" in proc.stderr
    assert not os.path.exists(out + ".argv") and "node all of" not in proc.stderr


def test_an_option_after_the_double_dash_goes_to_dft_train_unchanged():
    plan = plan_for(["cfg.yaml", "--", "--nodes", "2", "--nnodes", "4"], base_env())
    assert plan.nnodes == 1 and plan.train_args == ["cfg.yaml", "--nodes", "2", "--nnodes", "4"]


def test_dft_train_options_are_known_and_apart_from_the_launchers(capsys):
    from dft_ds import train

    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    usage = capsys.readouterr().out.split("\n\n", 1)[0]
    shown = set(re.findall(r"--[a-z][\w-]*", usage))
    assert shown and shown <= set(launch.TRAIN_OPTIONS)
    for option, takes_value in launch.TRAIN_OPTIONS.items():  # each entry is one dft-train takes, as it takes it
        ns = train.parse_args([option, "3"] if takes_value else [option])
        assert ns.args == []
    ours = {name for action in launch.build_parser()._actions for name in action.option_strings}
    assert not ours & set(launch.TRAIN_OPTIONS)


# --------------------------------------------------------------------------------------------
# launcher/dft-launch run by a python3 without torch (the first on PATH outside the venv)


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory):
    """A python3 first on PATH that cannot import torch: a venv of nothing."""
    bare = tmp_path_factory.mktemp("bare")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    python = str(bare / "bin" / "python3")
    assert subprocess.run([python, "-c", "import torch"], capture_output=True).returncode != 0
    env = {k: v for k, v in base_env().items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = f"{bare / 'bin'}{os.pathsep}/usr/bin{os.pathsep}/bin"
    return python, env


def test_wrapper_outside_the_venv_hands_over_to_the_checkouts_venv(bare_python):
    venv_python = os.path.join(REPO, ".venv", "bin", "python")
    if not os.path.exists(venv_python):
        pytest.skip(f"no {venv_python} (tests run from another environment)")
    _, env = bare_python
    proc = subprocess.run([LAUNCHER, "--dry-run", "--nproc-per-node", "2", "x=1"], env=env, capture_output=True,
                          text=True, timeout=60, cwd="/")  # the shebang's python3 is the bare one
    assert proc.returncode == 0, proc.stderr
    command = shlex.split(proc.stdout.splitlines()[-1].split(": ", 1)[1])
    assert command[:3] == [venv_python, "-m", "torch.distributed.run"]  # was the bare python3: No module named 'torch'


def test_wrapper_takes_virtual_env_and_else_says_what_to_activate(bare_python, tmp_path):
    python, env = bare_python
    copy = tmp_path / "checkout" / "launcher" / "dft-launch"  # a checkout without .venv
    copy.parent.mkdir(parents=True)
    copy.write_text(open(LAUNCHER).read())
    proc = subprocess.run([python, str(copy), "--dry-run"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == EXIT_BAD_INPUT
    venv = tmp_path / "checkout" / ".venv"
    assert f"dft-launch: error: {python} cannot import torch, deepspeed" in proc.stderr
    assert f"source {venv}/bin/activate, or create it first with `make venv`" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([python, str(copy), "--dry-run"], env=dict(env, VIRTUAL_ENV=sys.prefix),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert shlex.split(proc.stdout.splitlines()[-1].split(": ", 1)[1])[0] == os.path.join(sys.prefix, "bin", "python")


def test_counts_of_one_are_singular(tmp_path, fakebin):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("n001 slots=2\n")
    with pytest.raises(UserError, match=f"--nnodes 2 but --hostfile {hostfile} lists 1 host$"):  # was "1 hosts"
        plan_for(["--hostfile", str(hostfile), "--nnodes", "2", "--node-rank", "0"], base_env())
    one_node = slurm_env(fakebin, SLURM_JOB_NODELIST="n001", SLURM_NNODES="1")
    (fakebin / "scontrol").write_text("#!/bin/sh\necho n001\n")
    with pytest.raises(UserError, match="--nnodes 2 but the Slurm allocation has 1 node$"):
        plan_for(["--nnodes", "2"], one_node)
    assert launch.describe(plan_for(["--nproc-per-node", "1"], base_env())).startswith(
        "# dft-launch via torchrun: 1 node x 1 rank, master 127.0.0.1:")
