"""Launch scripts in dry-run mode: the gcloud commands of the Cloud TPU launcher, the
SLURM srun rendering, and the shell scripts' syntax and output."""

import argparse
import importlib.util
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
TPU = ROOT / "launch" / "tpu" / "tpu.py"
GPU = ROOT / "launch" / "gpu"
TPU_ENV = dict(TPU_NAME="caco-v4", TPU_ZONE="us-central2-b", TPU_PROJECT="proj-1",
               TPU_TYPE="v4-32", TPU_WORKDIR="gs://bucket/run1",
               TPU_CONFIG="configs/cacophony.py:base")


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TPU_", "SLURM_", "REPO_")) and k not in (
               "CONFIG", "WORKDIR", "GPUS_PER_NODE", "COORDINATOR_PORT", "LAUNCH_MODE")}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


def tpu(*args, **env):
    """Runs tpu.py --dry-run; returns (exit code, gcloud argv lists, stderr)."""
    proc = subprocess.run([sys.executable, str(TPU), "--dry-run", *args], capture_output=True,
                          text=True, env=_clean_env(**{**TPU_ENV, **env}), timeout=60)
    commands = [shlex.split(line) for line in proc.stdout.splitlines()
                if line.startswith("gcloud ")]
    return proc.returncode, commands, proc.stderr


def _remote(argv):
    (command,) = [a for a in argv if a.startswith("--command=")]
    return command.removeprefix("--command=")


def test_create_tpu_vm():
    code, (cmd,), _ = tpu("create")
    assert code == 0
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "caco-v4"]
    for flag in ("--zone=us-central2-b", "--project=proj-1", "--accelerator-type=v4-32",
                 "--version=tpu-ubuntu2204-base"):
        assert flag in cmd
    assert "--spot" not in cmd
    # Flags override the environment; spot is a plain switch.
    code, (cmd,), _ = tpu("create", "--zone", "europe-west4-a", "--spot", "--type=v6e-8")
    assert "--zone=europe-west4-a" in cmd and "--spot" in cmd
    assert "--accelerator-type=v6e-8" in cmd and "--version=v2-alpha-tpuv6e" in cmd


def test_create_queued_resource():
    code, (cmd,), _ = tpu("create", TPU_QUEUED="1", TPU_SPOT="true", TPU_TYPE="v5litepod-16",
                          TPU_VALID_UNTIL="6h")
    assert code == 0
    assert cmd[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "caco-v4-qr"]
    for flag in ("--node-id=caco-v4", "--zone=us-central2-b", "--project=proj-1",
                 "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite",
                 "--spot", "--valid-until-duration=6h"):
        assert flag in cmd
    code, _, err = tpu("create", "--queued", "--preemptible")
    assert code == 2 and "--spot" in err


def test_setup_installs_matching_jax_on_all_workers():
    jax_pin = next(line for line in (ROOT / "requirements.txt").read_text().splitlines()
                   if line.startswith("jax=="))
    code, cmds, _ = tpu("setup", REPO_URL="https://example.org/caco.git", REPO_REF="v1.0")
    assert code == 0
    (ssh,) = cmds
    assert ssh[4] == "ssh" and "--worker=all" in ssh and "--zone=us-central2-b" in ssh
    script = _remote(ssh)
    assert "git clone --quiet https://example.org/caco.git" in script
    assert "fetch --quiet https://example.org/caco.git v1.0" in script
    assert "pip install --quiet -r requirements.txt 'jax[tpu]==" + jax_pin[5:] + "'" in script
    # Without REPO_URL the checkout is copied to every worker first.
    code, (scp, ssh), _ = tpu("setup")
    assert scp[4] == "scp" and "--worker=all" in scp and scp[-1] != scp[5]
    assert "tar -xzf" in _remote(ssh) and "apt-get install -y -qq gcsfuse" in _remote(ssh)
    subprocess.run(["bash", "-n", "-c", _remote(ssh)], check=True)


def test_run_starts_training_on_all_workers_and_streams_worker0():
    code, (start, stream), _ = tpu("run", "--", "--config.train.steps=10", "--config.x=a b",
                                   "--config.data.train.path=gs://data-b/set",
                                   "--config.data.extra_evals=clotho:gs://ev/c:evaluation,"
                                   "esc50:gs://data-b/esc",
                                   TPU_ENV="JAX_COMPILATION_CACHE_DIR=gs://bucket/xla A=gs:")
    assert code == 0
    assert start[4] == "ssh" and "--worker=all" in start and "--project=proj-1" in start
    script = _remote(start)
    # gs:// paths become the workers' Cloud Storage FUSE mounts, each bucket mounted once.
    assert ("python -m cacophony_jax.main --config=configs/cacophony.py:base "
            "--workdir=/mnt/gcs/bucket/run1 --distributed=on --config.train.steps=10 "
            "'--config.x=a b' --config.data.train.path=/mnt/gcs/data-b/set") in script
    mount = "gcsfuse --implicit-dirs --rename-dir-limit=100000"  # Orbax renames folders
    assert script.count(f"{mount} bucket /mnt/gcs/bucket") == 1
    assert script.count(f"{mount} data-b /mnt/gcs/data-b") == 1
    # Inside a list too (config.data.extra_evals).
    assert ("--config.data.extra_evals=clotho:/mnt/gcs/ev/c:evaluation,"
            "esc50:/mnt/gcs/data-b/esc") in script
    assert script.count("gcsfuse --implicit-dirs --rename-dir-limit=100000 ev /mnt/gcs/ev") == 1
    assert "export JAX_COMPILATION_CACHE_DIR=/mnt/gcs/bucket/xla" in script
    assert "export A=gs:" in script
    assert "nohup" in script and '>> "$LOG"' in script and "-worker$W.log" in script
    assert "--worker=0" in stream and "tail" in _remote(stream)
    assert "-worker0.log" in _remote(stream)
    # The remote scripts must be valid shell.
    for argv in (start, stream):
        subprocess.run(["bash", "-n", "-c", _remote(argv)], check=True)


def test_other_commands():
    _, (cmd,), _ = tpu("logs", "--worker=3", "--no-follow")
    assert "--worker=3" in cmd and "-F" not in _remote(cmd) and "-worker3.log" in _remote(cmd)
    _, (cmd,), _ = tpu("delete")
    assert cmd[3:6] == ["tpu-vm", "delete", "caco-v4"] and "--quiet" in cmd
    _, (cmd,), _ = tpu("delete", "--queued")
    assert cmd[3:6] == ["queued-resources", "delete", "caco-v4-qr"] and "--force" in cmd
    _, cmds, _ = tpu("status", "--queued")
    assert [c[4] for c in cmds] == ["describe", "describe"]
    _, cmds, _ = tpu("resume", "--no-stream")
    assert len(cmds) == 2 and "kill" in _remote(cmds[0]) and "nohup" in _remote(cmds[1])
    _, cmds, _ = tpu("resume", "--recreate", "--queued", "--no-stream")
    assert [c[4] for c in cmds] == ["delete", "create", "describe", "scp", "ssh", "ssh"]
    for cmd in cmds:
        if cmd[4] == "ssh":
            subprocess.run(["bash", "-n", "-c", _remote(cmd)], check=True)


def test_missing_setting_names_the_variable():
    env = dict(TPU_ENV, TPU_ZONE="")
    code, cmds, err = tpu("status", **env)
    assert code == 2 and not cmds
    assert "TPU_ZONE is not set" in err and "--zone" in err and "Traceback" not in err
    code, _, err = tpu("run", TPU_WORKDIR="")
    assert code == 2 and "TPU_WORKDIR" in err
    code, _, err = tpu("create", TPU_SPOT="maybe")
    assert code == 2 and "TPU_SPOT" in err
    for name, value in (("TPU_TYPE", "v4-0"), ("TPU_ZONE", "us central"), ("TPU_NAME", "My_TPU")):
        code, cmds, err = tpu("create", **{name: value})
        assert code == 2 and not cmds and f"{name}={value!r} does not look like" in err


def test_example_env_is_complete():
    """Sourcing example.env gives every setting create/setup/run need."""
    script = (f"set -a; . {shlex.quote(str(ROOT / 'launch/tpu/example.env'))}; set +a; "
              f"{shlex.quote(sys.executable)} {shlex.quote(str(TPU))} --dry-run run --no-stream")
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                          env=_clean_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--workdir=/mnt/gcs/my-bucket/cacophony/stage2" in proc.stdout
    assert '"$HOME"/cacophony_jax' in proc.stdout  # ~ left for the worker to expand


def _render_module():
    spec = importlib.util.spec_from_file_location("launch_render", GPU / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_nodelist_expansion():
    render = _render_module()
    expand = render.expand_nodelist
    assert expand("gpu-[01-04]") == ["gpu-01", "gpu-02", "gpu-03", "gpu-04"]
    assert expand("a[1-2,5],b,c[08-10]-ib") == ["a1", "a2", "a5", "b", "c08-ib", "c09-ib",
                                                "c10-ib"]
    assert expand("r[1-2]n[1-2]") == ["r1n1", "r1n2", "r2n1", "r2n2"]
    assert expand("node7") == ["node7"]
    error = render.NodeListError
    for bad in ("gpu-[01-04", "gpu-01]", "gpu-[04-01]", "gpu-[a-b]", "a,,b"):
        with pytest.raises(error):
            expand(bad)


def _render(*args, **env):
    proc = subprocess.run([sys.executable, str(GPU / "render.py"), *args], capture_output=True,
                          text=True, env=_clean_env(**env), timeout=60)
    return proc.returncode, proc.stdout, proc.stderr


def test_render_srun_command():
    code, out, _ = _render("--dry-run", "--nodes=4", "--gpus-per-node=8",
                           "--nodelist=gpu-[01-04]", "--config=configs/mae.py:base",
                           "--workdir=/shared/run", "--", "--config.train.steps=5")
    assert code == 0
    assert "coordinator gpu-01:61440" in out and "= 32 processes" in out
    srun = shlex.split(out.splitlines()[-1])
    assert srun[:6] == ["srun", "--nodes=4", "--ntasks=32", "--ntasks-per-node=8",
                        "--kill-on-bad-exit=1", "--label"]  # lines start with the task id
    assert srun[6:] == ["python", "-m", "cacophony_jax.main", "--config=configs/mae.py:base",
                        "--workdir=/shared/run", "--config.train.steps=5"]
    code, out, _ = _render("--dry-run", "--mode=explicit", "--port=2222", CONFIG="c.py:tiny",
                           WORKDIR="/w", SLURM_JOB_NUM_NODES="2", GPUS_PER_NODE="4",
                           SLURM_JOB_NODELIST="n[7-8]")
    assert code == 0
    assert "export COORDINATOR_ADDRESS=n7:2222" in out and "export NUM_PROCESSES=8" in out
    per_task = shlex.split(out.splitlines()[-1])[-1]
    assert 'PROCESS_ID="$SLURM_PROCID"' in per_task and "--workdir=/w" in per_task
    # The port JAX's SLURM detection would pick: jobs sharing a first node differ.
    code, out, _ = _render("--dry-run", CONFIG="c", WORKDIR="w", SLURM_JOB_NUM_NODES="1",
                           GPUS_PER_NODE="4", SLURM_JOB_NODELIST="n1", SLURM_JOB_ID="8197")
    assert "export JAX_COORDINATOR_PORT=61445" in out
    code, _, err = _render("--dry-run", "--port=0", CONFIG="c", WORKDIR="w",
                           SLURM_JOB_NUM_NODES="1", GPUS_PER_NODE="4", SLURM_JOB_NODELIST="n1")
    assert code == 2 and "port 0 is not in 1-65535" in err
    code, _, err = _render("--dry-run", "--nodes=3", "--gpus-per-node=8",
                           "--nodelist=gpu-[01-04]", "--config=c", "--workdir=w")
    assert code == 2 and "names 4 hosts but --nodes=3" in err
    code, _, err = _render("--dry-run")
    assert code == 2 and "SLURM_JOB_NODELIST" in err and "Traceback" not in err
    code, _, err = _render("--dry-run", GPUS_PER_NODE="abc")
    assert code == 2 and "GPUS_PER_NODE='abc' is not a whole number" in err


def test_shell_scripts_parse():
    for script in ("slurm.sbatch", "single_node.sh"):
        subprocess.run(["bash", "-n", str(GPU / script)], check=True)


@pytest.mark.skipif(shutil.which("scontrol") is not None, reason="uses render.py's expansion")
@pytest.mark.parametrize("mode", ["slurm", "explicit"])
def test_sbatch_matches_render(mode, tmp_path):
    slurm = dict(SLURM_JOB_NODELIST="gpu-[01-04]", SLURM_JOB_NUM_NODES="4", GPUS_PER_NODE="8",
                 SLURM_JOB_ID="4242",
                 CONFIG="configs/cacophony.py:base", WORKDIR="/shared/run", LAUNCH_MODE=mode,
                 SLURM_SUBMIT_DIR=str(ROOT), SLURM_CPUS_PER_TASK="12")

    def sbatch(**env):
        return subprocess.run(["bash", str(GPU / "slurm.sbatch"), "--config.train.steps=5"],
                              capture_output=True, text=True, cwd=tmp_path, timeout=60,
                              env=_clean_env(**{**slurm, **env}))

    proc = sbatch(DRY_RUN="true")
    assert proc.returncode == 0, proc.stderr
    code, out, _ = _render("--dry-run", "--", "--config.train.steps=5", **slurm)
    assert code == 0
    # Same environment and the same srun argv, whichever prints it.
    assert proc.stdout.splitlines()[:-1] == out.splitlines()[:-1]
    srun = shlex.split(proc.stdout.splitlines()[-1])
    assert srun == shlex.split(out.splitlines()[-1])
    assert "--cpus-per-task=12" in srun  # srun does not inherit sbatch's
    for env, message in ((dict(DRY_RUN="maybe"), "DRY_RUN must be"),
                         (dict(DRY_RUN="1", GPUS_PER_NODE="abc"), "GPUS_PER_NODE must be"),
                         (dict(DRY_RUN="1", SLURM_JOB_NUM_NODES="0"), "NUM_NODES must be"),
                         (dict(DRY_RUN="1", COORDINATOR_PORT="70000"), "at most 65535")):
        proc = sbatch(**env)
        assert proc.returncode == 2 and message in proc.stderr, (env, proc.stderr)
        assert not proc.stdout


def test_explicit_coordinator_wins_over_slurm(monkeypatch):
    from cacophony_jax.parallel import distributed

    for name in ("COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert distributed.detected_environment() == "slurm"
    monkeypatch.setenv("COORDINATOR_ADDRESS", "n7:2222")  # LAUNCH_MODE=explicit
    assert distributed.detected_environment() == "explicit"


def test_single_node_dry_run():
    proc = subprocess.run(["bash", str(GPU / "single_node.sh"), "--config.train.steps=3"],
                          capture_output=True, text=True, timeout=60,
                          env=_clean_env(DRY_RUN="yes", CONFIG="configs/mae.py:tiny",
                                         WORKDIR="/tmp/w"))
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stdout)
    assert "-u" in argv and "SLURM_PROCID" in argv  # JAX must not see a 1-task SLURM job
    assert argv[argv.index("python"):] == ["python", "-m", "cacophony_jax.main",
                                           "--config=configs/mae.py:tiny", "--workdir=/tmp/w",
                                           "--config.train.steps=3"]
    proc = subprocess.run(["bash", str(GPU / "single_node.sh")], capture_output=True,
                          text=True, timeout=60, env=_clean_env(DRY_RUN="1"))
    assert proc.returncode != 0 and "CONFIG" in proc.stderr


def test_setup_copy_leaves_environments_behind(tmp_path):
    spec = importlib.util.spec_from_file_location("launch_tpu", TPU)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    archive = tmp_path / "src.tar.gz"
    module._pack_repo(str(archive))
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert "./cacophony_jax/__init__.py" in names and "./requirements.txt" in names
    assert not [n for n in names if any(p in (".venv", ".git", "__pycache__")
                                        for p in n.split("/"))]


def test_recreate_after_a_failed_create_and_a_stop_that_times_out(tmp_path):
    # A fake gcloud: the TPU is gone (deleted by an earlier try whose create found no
    # capacity), so `resume --recreate` must not fail on the delete.
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "bin" / "gcloud"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho \"$*\" >> {shlex.quote(str(calls))}\n"
                    "case \"$*\" in *describe*) echo \"ERROR: NOT_FOUND: Resource was not "
                    "found\" >&2; exit 1;; esac\nexit 0\n")
    fake.chmod(0o755)
    env = _clean_env(**TPU_ENV, REPO_URL="https://example.org/c.git")
    env["PATH"] = f"{fake.parent}{os.pathsep}{env['PATH']}"
    proc = subprocess.run([sys.executable, str(TPU), "resume", "--recreate", "--no-stream"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "does not exist; nothing to delete" in proc.stderr
    verbs = [line.split()[3] for line in calls.read_text().splitlines()]
    assert verbs == ["describe", "create", "ssh", "ssh"]
    # `stop` on a worker whose training outlives TPU_STOP_WAIT fails (so `resume` starts
    # nothing on a half-stopped slice); the worker script is run here for real.
    spec = importlib.util.spec_from_file_location("launch_gcloud", TPU.parent / "gcloud.py")
    gcloud = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gcloud)
    stubborn = subprocess.Popen(["bash", "-c", "trap '' TERM; sleep 30; true",
                                 "python -m cacophony_jax.main"])
    # A pid file left by a run that ended, whose pid another process has now.
    other = subprocess.Popen(["sleep", "30"])
    try:
        cfg = argparse.Namespace(log_dir=str(tmp_path), run_name="train", stop_wait="1")
        (tmp_path / "train.pid").write_text(f"{stubborn.pid}\n")
        proc = subprocess.run(["bash", "-c", "; ".join(gcloud.stop_script(cfg))],
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 1 and "still running after 1 s" in proc.stderr
        assert (tmp_path / "train.pid").exists()
        (tmp_path / "train.pid").write_text(f"{other.pid}\n")
        proc = subprocess.run(["bash", "-c", "; ".join(gcloud.stop_script(cfg))],
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0 and "not running" in proc.stdout, proc.stderr
        assert other.poll() is None and not (tmp_path / "train.pid").exists()
    finally:
        for process in (stubborn, other):
            process.kill()
            process.wait()
    code, _, err = tpu("stop", TPU_STOP_WAIT="soon")
    assert code == 2 and "TPU_STOP_WAIT='soon' must be a whole number" in err


def test_distributed_timeouts_reach_jax(monkeypatch):
    import jax

    from cacophony_jax.parallel import distributed

    seen, probed = {}, []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: seen.update(kw))
    monkeypatch.setattr(distributed, "wait_for_coordinator", lambda *a: probed.append(a))
    assert distributed.initialize("auto", "node1:1234", 2, 1, init_timeout=900,
                                  heartbeat_timeout=20)
    assert probed == [("node1", 1234, 900)]  # process 0 serves it: only the others wait
    assert seen == dict(coordinator_address="node1:1234", num_processes=2, process_id=1,
                        initialization_timeout=900, heartbeat_timeout_seconds=20)
    with pytest.raises(ValueError, match="--heartbeat_timeout=0: give a number of seconds"):
        distributed.initialize("auto", "node1:1234", 2, 1, heartbeat_timeout=0)
    monkeypatch.undo()
    # A coordinator that is not there: one clear error, not JAX's abort.
    with pytest.raises(ValueError, match="cannot be resolved"):
        distributed.wait_for_coordinator("nosuchhost.invalid", 1234, 2)
    import socket

    with socket.socket() as listener:  # a port nobody listens on, once closed
        listener.bind(("localhost", 0))
        port = listener.getsockname()[1]
    with pytest.raises(ValueError, match=rf"nothing answered at .*:{port} within 1 s"):
        distributed.wait_for_coordinator("localhost", port, 1)
    with socket.socket() as listener:  # and one that answers
        listener.bind(("localhost", 0))
        listener.listen()
        distributed.wait_for_coordinator("localhost", listener.getsockname()[1], 1)


def test_setup_unpack_removes_files_the_new_checkout_dropped(tmp_path):
    """The unpack lines run in bash: a file deleted from the checkout goes from the
    workers too; the venv and a run folder inside the code folder stay."""
    spec = importlib.util.spec_from_file_location("gcloud_lines", ROOT / "launch" / "tpu" /
                                                  "gcloud.py")
    gcloud = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gcloud)
    home = tmp_path / "home"
    home.mkdir()

    def setup(files):
        checkout = tmp_path / "checkout"
        shutil.rmtree(checkout, ignore_errors=True)
        for name in files:
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            (checkout / name).write_text(name)
        with tarfile.open(home / gcloud.ARCHIVE_NAME, "w:gz") as tar:
            tar.add(checkout, arcname=".")
        lines = ["set -euo pipefail", *gcloud.unpack_lines(gcloud.rpath("~/code"))]
        subprocess.run(["bash", "-c", "; ".join(lines)], check=True,
                       env={"HOME": str(home), "PATH": os.environ["PATH"]})

    setup(["a.py", "pkg/old.py", "pkg/kept.py", "with space.txt"])
    (home / "code" / ".venv").mkdir()
    (home / "code" / "runs" / "r1").mkdir(parents=True)
    setup(["a.py", "pkg/kept.py"])
    left = sorted(str(p.relative_to(home / "code")) for p in (home / "code").rglob("*")
                  if p.is_file() or not any(p.iterdir()))
    assert left == [".launcher_files", ".venv", "a.py", "pkg/kept.py", "runs/r1"]
    assert not (home / gcloud.ARCHIVE_NAME).exists()
