"""The GPU launch scripts in dry-run mode and how their processes find the coordinator."""

import importlib.util
import shlex
import shutil
import subprocess
import sys

import pytest

from tests.test_launch import ROOT, _clean_env

GPU = ROOT / "launch" / "gpu"


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
    # The coordinator goes to JAX whole: its own parser would read "rack1" here.
    code, out, _ = _render("--dry-run", "--nodes=4", "--gpus-per-node=8",
                           "--nodelist=rack[1-2]-node[01-02]", "--config=c", "--workdir=w")
    assert code == 0 and "export JAX_COORDINATOR_ADDRESS=rack1-node01:61440" in out
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

    for name in ("COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "NUM_PROCESSES", "PROCESS_ID",
                 "JAX_COORDINATOR_ADDRESS", *distributed.SLURM_TASK_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    # An allocation of two tasks entered without srun: JAX would wait or fail unclearly.
    with pytest.raises(ValueError, match=r"not as one of its srun tasks \(SLURM_STEP_NODELIST, "
                                         r"SLURM_PROCID, SLURM_LOCALID not set\)"):
        distributed.detected_environment()
    for name, value in zip(distributed.SLURM_TASK_VARIABLES, ("n[1-2]", "1", "0"), strict=True):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "n1:2222")  # as slurm.sbatch exports it
    assert distributed.detected_environment() == "slurm"
    monkeypatch.setenv("COORDINATOR_ADDRESS", "n7:2222")  # LAUNCH_MODE=explicit
    assert distributed.detected_environment() == "explicit"


@pytest.mark.parametrize("names", [("NUM_PROCESSES",), ("PROCESS_ID",),
                                   ("NUM_PROCESSES", "PROCESS_ID"), ("JAX_COORDINATOR_ADDRESS",)])
def test_half_an_explicit_environment_is_an_error(names, monkeypatch):
    """A misspelt or missing COORDINATOR_ADDRESS would otherwise start a one-process run."""
    from cacophony_jax.parallel import distributed

    for name in ("COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "NUM_PROCESSES",
                 "PROCESS_ID", "JAX_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.detected_environment() is None
    for name in names:
        monkeypatch.setenv(name, "n1:1234" if name == "JAX_COORDINATOR_ADDRESS" else "2")
    with pytest.raises(ValueError, match=f"{' and '.join(names)} set but COORDINATOR_ADDRESS "
                                         "is not"):
        distributed.initialize("auto")
    # Flags name the run explicitly; off means one process whatever the environment says.
    assert not distributed.initialize("off")
    monkeypatch.setenv("COORDINATOR_ADDRESS", "n1:1234")
    monkeypatch.setenv("NUM_PROCESSES", "two")
    monkeypatch.setenv("PROCESS_ID", "1")
    with pytest.raises(ValueError, match="NUM_PROCESSES='two' is not a whole number"):
        distributed.initialize("auto")


def test_a_process_id_flag_alone_is_an_error(monkeypatch):
    """--process_id without the coordinator would train a one-process run of its own."""
    from cacophony_jax.parallel import distributed

    for name in ("COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "NUM_PROCESSES",
                 "PROCESS_ID", "JAX_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="needs a coordinator address, process count"):
        distributed.initialize("auto", process_id=1)


def test_a_misspelt_cpu_collectives_names_the_flag():
    from cacophony_jax.parallel import distributed

    with pytest.raises(ValueError, match="--cpu_collectives='glo': use gloo"):
        distributed.initialize("auto", "n1:1234", 2, 0, "glo")

def test_slurm_tasks_wait_for_the_coordinator_the_launcher_names(monkeypatch):
    import jax

    from cacophony_jax.parallel import distributed

    seen, probed = {}, []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: seen.update(kw))
    monkeypatch.setattr(distributed, "wait_for_coordinator", lambda *a: probed.append(a))
    monkeypatch.delenv("COORDINATOR_ADDRESS", raising=False)
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
    for name, value in (("SLURM_JOB_ID", "9"), ("SLURM_NTASKS", "16"),
                        ("SLURM_STEP_NODELIST", "rack[1-2]-node[01-02]"), ("SLURM_LOCALID", "3"),
                        ("SLURM_PROCID", "0"),
                        ("JAX_COORDINATOR_ADDRESS", "rack1-node01:61449")):
        monkeypatch.setenv(name, value)
    assert distributed.initialize("auto", init_timeout=60)
    assert probed == []  # process 0 serves the address
    monkeypatch.setenv("SLURM_PROCID", "5")
    assert distributed.initialize("auto", init_timeout=60)
    assert probed == [("rack1-node01", 61449, 60, "JAX_COORDINATOR_ADDRESS")]
    assert "coordinator_address" not in seen  # JAX reads it, and the rest, itself


def test_distributed_on_without_a_cluster_is_one_clear_error(monkeypatch):
    import jax

    from cacophony_jax.parallel import distributed

    def no_cluster(**kwargs):
        raise ValueError("coordinator_address should be defined.")

    monkeypatch.setattr(jax.distributed, "initialize", no_cluster)
    with pytest.raises(ValueError, match="--distributed=on, but JAX found no cluster here"):
        distributed.initialize("on")


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


def test_distributed_timeouts_reach_jax(monkeypatch):
    import jax

    from cacophony_jax.parallel import distributed

    seen, probed = {}, []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: seen.update(kw))
    monkeypatch.setattr(distributed, "wait_for_coordinator", lambda *a: probed.append(a))
    assert distributed.initialize("auto", "node1:1234", 2, 1, init_timeout=900,
                                  heartbeat_timeout=20)
    assert probed == [("node1", 1234, 900, "--coordinator_address")]  # only the others wait
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
