"""The Cloud TPU launcher in dry-run mode: its gcloud commands and the worker scripts' syntax
and output (the GPU scripts are in test_launch_gpu.py)."""

import argparse
import importlib.util
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import tarfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
TPU = ROOT / "launch" / "tpu" / "tpu.py"
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
    # A workdir on the TPU's disks: refused before the delete that would take it along.
    code, cmds, err = tpu("resume", "--recreate", TPU_WORKDIR="runs/stage2")
    assert code == 2 and not cmds and "TPU_WORKDIR=runs/stage2 is on the TPU's own" in err


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
    code, cmds, err = tpu("create", TPU_SPOT="1", TPU_PREEMPTIBLE="1")
    assert code == 2 and not cmds and "TPU_SPOT and TPU_PREEMPTIBLE are both set" in err
    code, cmds, err = tpu("run", TPU_RUN_NAME="a`b")
    assert code == 2 and not cmds and "TPU_RUN_NAME='a`b': use letters" in err
    code, cmds, err = tpu("run", TPU_RUN_NAME="_train")  # '_' alone is fine, not first
    assert code == 2 and not cmds and "starting with a letter or digit" in err


def test_example_env_is_complete():
    """Sourcing example.env gives every setting create/setup/run need."""
    script = (f"set -a; . {shlex.quote(str(ROOT / 'launch/tpu/example.env'))}; set +a; "
              f"{shlex.quote(sys.executable)} {shlex.quote(str(TPU))} --dry-run run --no-stream")
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                          env=_clean_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--workdir=/mnt/gcs/my-bucket/cacophony/stage2" in proc.stdout
    assert '"$HOME"/cacophony_jax' in proc.stdout  # ~ left for the worker to expand


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
    # A second environment beside .venv (the README's .venv-hear) stays behind too.
    for path in ("cacophony_jax/a.py", ".venv-hear/lib/torch.py", ".venv/bin/python"):
        (tmp_path / "repo" / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "repo" / path).write_text("")
    module.REPO_ROOT = str(tmp_path / "repo")
    module._pack_repo(str(archive))
    with tarfile.open(archive) as tar:
        assert [n for n in tar.getnames() if n.endswith(".py")] == ["./cacophony_jax/a.py"]


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


def test_a_real_run_does_not_echo_credentials(tmp_path):
    fake = tmp_path / "bin" / "gcloud"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    env = _clean_env(**TPU_ENV, TPU_ENV="WANDB_API_KEY=s3cr3t-value HF_TOKEN=hf_abc MODE=x")
    env["PATH"] = f"{fake.parent}{os.pathsep}{env['PATH']}"
    proc = subprocess.run([sys.executable, str(TPU), "run", "--no-stream"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "+ gcloud compute tpus tpu-vm ssh" in proc.stderr
    assert "WANDB_API_KEY=***" in proc.stderr and "HF_TOKEN=***" in proc.stderr
    assert "s3cr3t" not in proc.stderr + proc.stdout and "hf_abc" not in proc.stderr
    assert "MODE=x" in proc.stderr  # other settings are shown as they are
    # A value the worker script has to quote (a space, ';', a quote) is hidden whole.
    env["TPU_ENV"] = "DB_PASSWORD='zq1 zq2;zq3'\\''zq4' API_KEY=\"zq5 zq6\""
    proc = subprocess.run([sys.executable, str(TPU), "run", "--no-stream"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "DB_PASSWORD=***" in proc.stderr and "API_KEY=***" in proc.stderr
    assert not any(part in proc.stderr for part in ("zq1", "zq2", "zq3", "zq4", "zq5", "zq6"))
    code, commands, _ = tpu("run", "--no-stream", TPU_ENV="WANDB_API_KEY=s3cr3t")
    assert code == 0 and "WANDB_API_KEY=s3cr3t" in _remote(commands[-1])  # the exact command
