"""Tests of the launch scripts in launch/: dry runs, flag checks, local runs.

The dry runs print one shell-quoted command per line; the tests read them back
with shlex.split and check the program, the flags the user gave and the
--config overrides rlnas.main expects. local.sh also runs for real, with a fake
interpreter (process handling) and with JAX on CPU (the coordinator flags).
Nothing here needs gcloud, SLURM, a GPU or shellcheck.
"""

import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ("local.sh", "tpu_vm.sh", "slurm_gpu.sbatch", "gpu_vm.sh")


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if k != "DRY_RUN"}
  env.update(extra)
  return env


def run_script(name, *args, env=None, cwd=REPO, timeout=60):
  """Runs launch/NAME with bash; returns the CompletedProcess."""
  return subprocess.run(["bash", str(LAUNCH / name), *args], cwd=cwd,
                        env=_env(**(env or {})), capture_output=True,
                        text=True, timeout=timeout, check=False)


def dry_run(name, *args, env=None, cwd=REPO):
  """Dry-runs launch/NAME and returns its commands, each as an argv list."""
  proc = run_script(name, "--dry_run", *args, env=env, cwd=cwd)
  assert proc.returncode == 0, proc.stderr
  return [shlex.split(line) for line in proc.stdout.splitlines()]


def flag_value(argv, flag):
  """The value of --flag=VALUE in argv (exactly one occurrence)."""
  values = [a.split("=", 1)[1] for a in argv if a.startswith(flag + "=")]
  assert len(values) == 1, (flag, argv)
  return values[0]


# --------------------------------------------------------------- all scripts


@pytest.mark.parametrize("name", SCRIPTS)
def test_syntax(name):
  proc = subprocess.run(["bash", "-n", str(LAUNCH / name)],
                        capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(name):
  proc = run_script(name, "--help")
  assert proc.returncode == 0, proc.stderr
  assert "Usage:" in proc.stdout
  assert "--dry_run" in proc.stdout


@pytest.mark.parametrize("name", SCRIPTS)
def test_uses_strict_mode(name):
  assert "set -euo pipefail" in (LAUNCH / name).read_text()


@pytest.mark.parametrize("name", ("local.sh", "tpu_vm.sh", "gpu_vm.sh"))
def test_executable(name):
  assert os.access(LAUNCH / name, os.X_OK)


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck not installed")
def test_shellcheck_clean():
  # -x follows `source launch/common.sh` (paths relative to the repo root).
  proc = subprocess.run(["shellcheck", "-x", *(str(LAUNCH / n) for n in SCRIPTS)],
                        capture_output=True, text=True, check=False,
                        cwd=LAUNCH.parent)
  assert proc.returncode == 0, proc.stdout


# ------------------------------------------------------------------ local.sh


def test_local_dry_run_one_command_per_process():
  cmds = dry_run("local.sh", "--num_processes=3", "--config=configs/x.py",
                 "--workdir=/tmp/w", "--port=12345", "--python=/opt/py",
                 "--data_dir=/data/tfds", "--config.search.max_children=8",
                 "--", "--config.child.epochs=1")
  assert len(cmds) == 3
  for i, argv in enumerate(cmds):
    assert argv[:3] == ["/opt/py", "-m", "rlnas.main"]
    assert flag_value(argv, "--config") == "configs/x.py"
    assert flag_value(argv, "--workdir") == "/tmp/w"
    assert flag_value(argv, "--config.distributed.coordinator_address") == (
        "127.0.0.1:12345")
    assert flag_value(argv, "--config.distributed.num_processes") == "3"
    assert flag_value(argv, "--config.distributed.process_id") == str(i)
    assert flag_value(argv, "--config.data.data_dir") == "/data/tfds"
    # Pass-through arguments come last, in the order given.
    assert argv[-2:] == ["--config.search.max_children=8",
                         "--config.child.epochs=1"]


def test_local_dry_run_env_and_space_separated_flags():
  by_env = run_script("local.sh", "--num_processes", "2", "--config",
                      "c.py", "--workdir", "w w", "--port", "2000",
                      env={"DRY_RUN": "1"})
  by_flag = run_script("local.sh", "--dry_run", "--num_processes=2",
                       "--config=c.py", "--workdir=w w", "--port=2000")
  assert by_env.returncode == 0, by_env.stderr
  assert by_env.stdout == by_flag.stdout
  # A workdir with a space survives the quoting.
  assert flag_value(shlex.split(by_env.stdout.splitlines()[0]),
                    "--workdir") == "w w"


def test_local_picks_one_free_port_for_all_processes():
  cmds = dry_run("local.sh", "--num_processes=2", "--config=c.py",
                 "--workdir=w", f"--python={sys.executable}")
  ports = {flag_value(a, "--config.distributed.coordinator_address")
           for a in cmds}
  assert len(ports) == 1
  host, port = ports.pop().rsplit(":", 1)
  assert host == "127.0.0.1" and 0 < int(port) < 65536


@pytest.mark.parametrize("args, message", [
    (("--workdir=w",), "--config is required"),
    (("--config=c.py",), "--workdir is required"),
    (("--config=c.py", "--workdir=w", "--num_processes=0"), "--num_processes"),
    (("--config=c.py", "--workdir=w", "--port=70000"), "--port"),
    (("--config=c.py", "--workdir"), "--workdir needs a value"),
])
def test_local_rejects_bad_flags(args, message):
  proc = run_script("local.sh", "--dry_run", *args)
  assert proc.returncode != 0
  assert message in proc.stderr
  assert proc.stdout == ""


FAKE_PYTHON = """\
#!/usr/bin/env bash
# Stands in for python: prints, then exits FAKE_FAIL_CODE if its process id is
# FAKE_FAIL_ID, else sleeps FAKE_SLEEP seconds and succeeds.
if [[ $1 == -c ]]; then exec {python} "$@"; fi
id=""
for a in "$@"; do
  case $a in --config.distributed.process_id=*) id=${{a#*=}} ;; esac
done
echo "out $id"
echo "err $id" >&2
if [[ $id == "${{FAKE_FAIL_ID:-none}}" ]]; then exit "${{FAKE_FAIL_CODE:-3}}"; fi
sleep "${{FAKE_SLEEP:-0}}"
echo "done $id"
"""


@pytest.fixture
def fake_python(tmp_path):
  path = tmp_path / "fake_python"
  path.write_text(FAKE_PYTHON.format(python=shlex.quote(sys.executable)))
  path.chmod(0o755)
  return path


def test_local_runs_all_processes_and_prefixes_output(tmp_path, fake_python):
  workdir = tmp_path / "work"
  proc = run_script("local.sh", f"--python={fake_python}", "--num_processes=3",
                    "--config=c.py", f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stderr
  for i in range(3):
    assert f"[process {i}] out {i}" in proc.stdout
    assert f"[process {i}] err {i}" in proc.stdout  # stderr is merged.
    assert f"[process {i}] done {i}" in proc.stdout
    log = (workdir / "launch_logs" / f"process_{i}.log").read_text()
    assert f"out {i}\n" in log and f"done {i}\n" in log


def test_local_failure_stops_the_others(tmp_path, fake_python):
  start = time.monotonic()
  proc = run_script("local.sh", f"--python={fake_python}", "--num_processes=3",
                    "--config=c.py", f"--workdir={tmp_path}",
                    env={"FAKE_FAIL_ID": "1", "FAKE_FAIL_CODE": "7",
                         "FAKE_SLEEP": "60"})
  elapsed = time.monotonic() - start
  assert proc.returncode == 7, proc.stderr
  assert "process 1 failed with exit code 7" in proc.stderr
  # The survivors were killed, not waited for (they sleep 60 s).
  assert elapsed < 30
  assert "done 0" not in proc.stdout and "done 2" not in proc.stdout


STAND_IN_MAIN = """\
\"\"\"Stands in for rlnas.main: joins JAX's runtime with local.sh's flags.\"\"\"
import sys

import jax
from jax.experimental import multihost_utils
import numpy as np

flags = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
jax.distributed.initialize(
    coordinator_address=flags["--config.distributed.coordinator_address"],
    num_processes=int(flags["--config.distributed.num_processes"]),
    process_id=int(flags["--config.distributed.process_id"]))
ids = multihost_utils.process_allgather(np.array([jax.process_index()]))
print("process", jax.process_index(), "of", jax.process_count(),
      "gathered", ids.ravel().tolist(), flush=True)
"""


def test_local_processes_meet_through_jax_distributed(tmp_path):
  """Two CPU processes find each other with local.sh's coordinator flags."""
  pytest.importorskip("jax")
  package = tmp_path / "rlnas"  # Shadows the real package: cwd comes first.
  package.mkdir()
  (package / "__init__.py").write_text("")
  (package / "main.py").write_text(STAND_IN_MAIN)
  proc = run_script("local.sh", f"--python={sys.executable}",
                    "--num_processes=2", "--config=unused.py",
                    f"--workdir={tmp_path / 'work'}", cwd=tmp_path,
                    env={"JAX_PLATFORMS": "cpu"}, timeout=120)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "[process 0] process 0 of 2 gathered [0, 1]" in proc.stdout
  assert "[process 1] process 1 of 2 gathered [0, 1]" in proc.stdout


# ----------------------------------------------------------------- tpu_vm.sh

TPU_FLAGS = ("--name=rlnas-test", "--zone=us-central2-b", "--project=my-proj")
RUN_FLAGS = ("--config=configs/x.py", "--bucket=gs://my-bucket/")


def remote_command(argv):
  """The --command=... script of a gcloud ssh argv."""
  return flag_value(argv, "--command")


def test_tpu_create():
  (argv,) = dry_run("tpu_vm.sh", "create", *TPU_FLAGS,
                    "--accelerator_type=v4-32", "--spot")
  assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create",
                      "rlnas-test"]
  assert flag_value(argv, "--zone") == "us-central2-b"
  assert flag_value(argv, "--project") == "my-proj"
  assert flag_value(argv, "--accelerator-type") == "v4-32"
  assert flag_value(argv, "--version") == "tpu-ubuntu2204-base"
  assert "--spot" in argv


@pytest.mark.parametrize("accelerator, version", [
    ("v4-8", "tpu-ubuntu2204-base"),
    ("v5litepod-8", "v2-alpha-tpuv5-lite"),
    ("v5p-8", "v2-alpha-tpuv5"),
    ("v6e-8", "v2-alpha-tpuv6e"),
])
def test_tpu_default_runtime_version(accelerator, version):
  (argv,) = dry_run("tpu_vm.sh", "create", *TPU_FLAGS,
                    f"--accelerator_type={accelerator}")
  assert flag_value(argv, "--version") == version


def test_tpu_runtime_version_flag_wins():
  (argv,) = dry_run("tpu_vm.sh", "create", *TPU_FLAGS,
                    "--runtime_version=v2-alpha-tpuv5-lite",
                    "--accelerator_type=v5litepod-16")
  assert flag_value(argv, "--version") == "v2-alpha-tpuv5-lite"


def test_tpu_setup_copies_the_checkout_to_all_workers():
  tar, scp, ssh = dry_run("tpu_vm.sh", "setup", *TPU_FLAGS,
                          "--jax_spec=jax[tpu]==0.10.2")
  assert tar[:2] == ["tar", "-czf"]
  assert tar[-3:] == ["-C", str(REPO), "."]
  assert "--exclude=.venv" in tar and "--exclude=.git" in tar
  tarball = tar[2]
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert scp[5:7] == [tarball, "rlnas-test:rlnas-src.tar.gz"]
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "rlnas-test"]
  for argv in (scp, ssh):
    assert flag_value(argv, "--worker") == "all"
    assert flag_value(argv, "--zone") == "us-central2-b"
  script = remote_command(ssh)
  assert "tar -xzf $HOME/rlnas-src.tar.gz" in script
  assert "pip install $src 'jax[tpu]==0.10.2' gcsfs" in script
  _assert_bash_syntax(script)


def test_tpu_setup_from_git():
  (ssh,) = dry_run("tpu_vm.sh", "setup", *TPU_FLAGS,
                   "--repo_url=https://github.com/me/rlnas.git",
                   "--git_ref=v0.1")
  script = remote_command(ssh)
  assert ("git clone --depth=1 --branch=v0.1 "
          "https://github.com/me/rlnas.git $HOME/rlnas") in script
  _assert_bash_syntax(script)


def _assert_bash_syntax(script):
  proc = subprocess.run(["bash", "-n", "-c", script], capture_output=True,
                        text=True, check=False)
  assert proc.returncode == 0, (script, proc.stderr)


def test_tpu_run_starts_the_search_on_all_workers():
  (ssh,) = dry_run("tpu_vm.sh", "run", *TPU_FLAGS, *RUN_FLAGS,
                   "--config.search.max_children=16", "--",
                   "--config.child.epochs=50")
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "rlnas-test"]
  assert flag_value(ssh, "--worker") == "all"
  script = remote_command(ssh)
  _assert_bash_syntax(script)
  words = shlex.split(script)
  assert words[:3] == ["cd", "$HOME/rlnas", "&&"]
  main = words[3:]
  assert main[:3] == ["$HOME/rlnas-venv/bin/python", "-m", "rlnas.main"]
  assert flag_value(main, "--config") == "configs/x.py"
  assert flag_value(main, "--workdir") == "gs://my-bucket/rlnas/rlnas-test"
  assert flag_value(main, "--config.data.data_dir") == (
      "gs://my-bucket/tensorflow_datasets")
  assert flag_value(main, "--config.distributed.enabled") == "True"
  assert main[-2:] == ["--config.search.max_children=16",
                       "--config.child.epochs=50"]


def test_tpu_run_command_runs_on_a_worker(tmp_path):
  """Executes the --command script with HOME=tmp, as a worker's shell would."""
  (tmp_path / "rlnas").mkdir()
  (tmp_path / "rlnas-venv" / "bin").mkdir(parents=True)
  python = tmp_path / "rlnas-venv" / "bin" / "python"
  python.write_text('#!/usr/bin/env bash\necho "cwd=$PWD"\n'
                    'printf "arg=%s\\n" "$@"\n')
  python.chmod(0o755)
  (ssh,) = dry_run("tpu_vm.sh", "run", *TPU_FLAGS, *RUN_FLAGS,
                   "--config.x=it's a value")
  proc = subprocess.run(["bash", "-c", remote_command(ssh)],
                        env=_env(HOME=str(tmp_path)), capture_output=True,
                        text=True, check=False)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines[0] == f"cwd={tmp_path / 'rlnas'}"
  assert "arg=--config.distributed.enabled=True" in lines
  assert "arg=--config.x=it's a value" in lines


def test_tpu_run_detach_uses_nohup():
  (ssh,) = dry_run("tpu_vm.sh", "run", *TPU_FLAGS, *RUN_FLAGS, "--detach")
  script = remote_command(ssh)
  assert " nohup " in script and script.endswith("&")
  assert "> $HOME/rlnas-run.log" in script
  _assert_bash_syntax(script)


def test_tpu_delete():
  (argv,) = dry_run("tpu_vm.sh", "delete", *TPU_FLAGS)
  assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete",
                      "rlnas-test"]
  assert "--quiet" in argv
  assert flag_value(argv, "--zone") == "us-central2-b"


def test_tpu_all_runs_every_step_in_order():
  cmds = dry_run("tpu_vm.sh", "all", *TPU_FLAGS, *RUN_FLAGS,
                 "--accelerator_type=v6e-8")
  steps = [a[4] if a[0] == "gcloud" else a[0] for a in cmds]
  assert steps == ["create", "tar", "scp", "ssh", "ssh", "delete"]
  assert "rlnas.main" in remote_command(cmds[4])
  kept = dry_run("tpu_vm.sh", "all", *TPU_FLAGS, *RUN_FLAGS, "--keep")
  assert [a[4] for a in kept if a[0] == "gcloud"][-1] == "ssh"


@pytest.mark.parametrize("args, message", [
    (TPU_FLAGS, "a subcommand is required"),
    (("create", "--zone=z"), "--name is required"),
    (("create", "--name=t"), "--zone is required"),
    (("create", "--name=Bad_Name", "--zone=z"), "--name must be"),
    (("create", "--name=t", "--zone=z", "--accelerator_type=v99-8"),
     "--runtime_version"),
    (("run", "--name=t", "--zone=z", "--bucket=gs://b"), "--config is required"),
    (("run", "--name=t", "--zone=z", "--config=c.py"), "--workdir"),
    (("run", "--name=t", "--zone=z", "--config=c.py", "--workdir=/local",
      "--data_dir=gs://b/d"), "must be a gs:// path"),
    (("run", "--name=t", "--zone=z", "--config=c.py", "--workdir=gs://b/w",
      "--data_dir=/local"), "must be a gs:// path"),
    (("run", "--name=t", "--zone=z", "--config=c.py", "--bucket=b"),
     "--bucket must start with gs://"),
    (("all", "--name=t", "--zone=z", *RUN_FLAGS, "--detach"),
     "--detach cannot be used with 'all'"),
    (("create", "delete", "--name=t", "--zone=z"), "two subcommands"),
])
def test_tpu_rejects_bad_flags(args, message):
  proc = run_script("tpu_vm.sh", "--dry_run", *args)
  assert proc.returncode != 0
  assert message in proc.stderr
  assert proc.stdout == ""


# ---------------------------------------------------------- slurm_gpu.sbatch


def test_slurm_header_asks_for_one_task_per_node_with_gpus():
  text = (LAUNCH / "slurm_gpu.sbatch").read_text()
  header = [line.split()[1] for line in text.splitlines()
            if line.startswith("#SBATCH")]
  assert any(h.startswith("--nodes=") for h in header)
  assert "--ntasks-per-node=1" in header
  assert any(h.startswith("--gpus-per-node=") for h in header)


def test_slurm_dry_run():
  proc = run_script("slurm_gpu.sbatch", "--config=configs/x.py",
                    "--workdir=/shared/run1", "--data_dir=/shared/tfds",
                    "--config.search.max_children=64",
                    env={"DRY_RUN": "1", "SLURM_GPUS_PER_NODE": "a100:4",
                         "SLURM_CPUS_PER_TASK": "12"})
  assert proc.returncode == 0, proc.stderr
  (line,) = proc.stdout.splitlines()
  argv = shlex.split(line)
  assert argv[0] == "srun"
  assert "--ntasks-per-node=1" in argv
  assert "--kill-on-bad-exit=1" in argv
  assert flag_value(argv, "--cpus-per-task") == "12"
  # One process sees all 4 GPUs of its node, not only GPU SLURM_LOCALID.
  env_at = argv.index("env")
  assert argv[env_at + 1] == "JAX_LOCAL_DEVICE_IDS=0,1,2,3"
  assert argv[env_at + 2:env_at + 5] == ["python", "-m", "rlnas.main"]
  assert flag_value(argv, "--config") == "configs/x.py"
  assert flag_value(argv, "--workdir") == "/shared/run1"
  assert flag_value(argv, "--config.data.data_dir") == "/shared/tfds"
  assert flag_value(argv, "--config.distributed.enabled") == "True"
  assert argv[-1] == "--config.search.max_children=64"


def test_slurm_gpus_per_node_flag_and_python():
  (argv,) = dry_run("slurm_gpu.sbatch", "--config=c.py", "--workdir=w",
                    "--gpus_per_node=2", "--python=/venv/bin/python")
  assert "JAX_LOCAL_DEVICE_IDS=0,1" in argv
  assert "/venv/bin/python" in argv


@pytest.mark.parametrize("args, message", [
    (("--workdir=w",), "--config is required"),
    (("--config=c.py",), "--workdir is required"),
    (("--config=c.py", "--workdir=w", "--gpus_per_node=x"), "--gpus_per_node"),
])
def test_slurm_rejects_bad_flags(args, message):
  proc = run_script("slurm_gpu.sbatch", "--dry_run", *args)
  assert proc.returncode != 0
  assert message in proc.stderr


def test_slurm_refuses_to_run_outside_a_job():
  proc = run_script("slurm_gpu.sbatch", "--config=c.py", "--workdir=w",
                    env={"SLURM_JOB_ID": ""})
  assert proc.returncode != 0
  assert "not inside a SLURM job" in proc.stderr


# ----------------------------------------------------------------- gpu_vm.sh


def test_gpu_vm_all(tmp_path):
  (tmp_path / "pyproject.toml").write_text("")
  cmds = dry_run("gpu_vm.sh", "all", "--config=configs/x.py",
                 "--workdir=/data/run1", "--venv=/opt/venv", "--gpus=0,1",
                 "--data_dir=/data/tfds", "--config.search.max_children=8",
                 cwd=tmp_path)
  assert cmds[0] == ["python3", "-m", "venv", "/opt/venv"]
  assert ["/opt/venv/bin/python", "-m", "pip", "install", "-e", ".",
          "jax[cuda12]"] in cmds
  run = cmds[-1]
  assert run[:2] == ["env", "CUDA_VISIBLE_DEVICES=0,1"]
  assert run[2:5] == ["/opt/venv/bin/python", "-m", "rlnas.main"]
  assert flag_value(run, "--config") == "configs/x.py"
  assert flag_value(run, "--workdir") == "/data/run1"
  assert flag_value(run, "--config.data.data_dir") == "/data/tfds"
  assert run[-1] == "--config.search.max_children=8"
  # One process drives all local GPUs: no multi-process runtime.
  assert not any(a.startswith("--config.distributed") for a in run)


def test_gpu_vm_run_defaults():
  (run,) = dry_run("gpu_vm.sh", "run", "--config=c.py", "--workdir=w",
                   "--jax_spec=jax[cuda13]")
  assert run == [".venv/bin/python", "-m", "rlnas.main", "--config=c.py",
                 "--workdir=w"]


@pytest.mark.parametrize("args, message", [
    (("--config=c.py", "--workdir=w"), "a subcommand is required"),
    (("run", "--workdir=w"), "--config is required"),
    (("run", "--config=c.py"), "--workdir is required"),
    (("run", "--config=c.py", "--workdir=w", "--gpus=0;1"), "--gpus"),
])
def test_gpu_vm_rejects_bad_flags(args, message):
  proc = run_script("gpu_vm.sh", "--dry_run", *args)
  assert proc.returncode != 0
  assert message in proc.stderr


def test_gpu_vm_setup_needs_a_project_to_install(tmp_path):
  proc = run_script("gpu_vm.sh", "setup", "--dry_run", cwd=tmp_path)
  assert proc.returncode != 0
  assert "pyproject.toml" in proc.stderr


def test_readme_examples_name_existing_scripts():
  readme = (LAUNCH / "README.md").read_text()
  for name in SCRIPTS:
    assert f"launch/{name}" in readme
  assert "DRY_RUN=1" in readme
