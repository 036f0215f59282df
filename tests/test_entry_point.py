"""The training entry point as a user runs it: a subprocess of `python -m
cacophony_jax.main`, its one-line errors, stop signals and a killed process's resume."""

import os
import signal
import subprocess
import sys
import time

import pytest

from cacophony_jax.train import host, loop, stages
from tests.helpers import ROOT, assert_trees_equal, read_metrics, restore_params, tiny_config


def _run_main(args, **kwargs):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen([sys.executable, "-m", "cacophony_jax.main", *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **kwargs)


FAST_FLAGS = ["--config.audio.clip_seconds=1", "--config.audio.eval_clip_seconds=1",
              "--config.data.synthetic_train_size=32", "--config.data.synthetic_eval_size=8",
              "--config.data.global_batch_size=8", "--config.data.eval_batch_size=8",
              "--config.optim.warmup_steps=1"]


def test_entry_point_trains_and_rejects_a_misspelt_key(tmp_path):
    cache = tmp_path / "xla_cache"
    proc = _run_main(["--config=configs/mae.py:tiny,steps=2", f"--workdir={tmp_path}",
                      f"--compilation_cache={cache}", *FAST_FLAGS])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "step 2/2" in out and "eval at step 2" in out
    assert os.path.isdir(tmp_path / "checkpoints" / "2")
    assert os.listdir(cache)  # the step (compiled for over a second) was cached
    # Config mistakes end in one line naming the argument and the fix, no traceback.
    not_python = tmp_path / "notes.txt"
    not_python.write_text("mesh = (\n")
    for args, message in (
            (["--config.optim.learnig_rate=1"], "--config.optim.learnig_rate=1: the config has "
             "no field 'learnig_rate'; did you mean 'learning_rate'?"),
            (["--config.nothing.x=1"], "--config.nothing.x=1: the config has no field 'nothing'"),
            (["--config=configs/nope.py"], "configs/nope.py: there is no file 'configs/nope.py'"),
            (["--config=configs/quickstart.py", "--config.optim.sam.enabled=true"],
             "a stage's settings are --config.stages.<stage>.optim.sam.enabled=true"),
            (["--config=configs/mae.py:huge"], "unknown variant 'huge'; choose one of"),
            (["--config.loss.kind=sigmoid"],
             "the config has no field 'loss'; its top-level fields are audio, data,"),
            (["--config.optim.learning_rate=-1"], "config.optim.learning_rate"),
            (["--config=configs"], "'configs' is a folder; name a config file in it"),
            (["--config", str(not_python)], "is not a Python config file ('(' was never"),
            (["--config.mesh.fsdp=1.5"], "mesh.fsdp takes a whole number (its value is 1)"),
            (["--cpu_devices=-3"], "flag --cpu_devices=-3: -3 is not a non-negative integer"),
            # A word that is not a flag: a value written with a space, a config file.
            (["--config.optim.sam.enabled", "true"], "unexpected argument 'true': a config "
             "field's value goes after '=' (--config.optim.sam.enabled=true)"),
            (["configs/cacophony.py"], "a config file is given as --config=configs/cac"),
            # Two config files: absl would take the last one (or fail on an override).
            (["--config=configs/mae.py:tiny", "--config.train.steps=3", "--config",
              "configs/cacophony.py"],
             "--config is given 2 times (configs/mae.py:tiny, configs/cacophony.py)")):
        own = any(a == "--config" or a.startswith("--config=") for a in args)
        base = [] if own else ["--config=configs/mae.py:tiny"]
        proc = _run_main([*base, f"--workdir={tmp_path}", *args])
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 2 and out.startswith("error: ") and message in out, out
        assert "Traceback" not in out and len(out.splitlines()) == 1, out
    proc = _run_main(["--config=configs/quickstart.py", f"--workdir={tmp_path}",
                      "--config.stages.stage2.train.steps=1"])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "no field 'stage2'; its stages are mae, cacophony" in out


def test_config_file_mistakes_are_named(tmp_path, monkeypatch):
    from cacophony_jax import config_errors

    def say(*argv, error=None):
        monkeypatch.setattr(sys, "argv", ["main", *argv])
        return config_errors.one_line(error or OSError("not read"))

    (tmp_path / "mine.py").write_text("def get_config(arg=None):\n    return None\n")
    (tmp_path / "notes.py").write_text("x = 1\n")
    (tmp_path / "odd.py").mkdir()  # a folder named like a file is passed over
    assert say(f"--config={tmp_path}:tiny") == (
        f"--config={tmp_path}:tiny: {str(tmp_path)!r} is a folder; name a config file in "
        f"it, e.g. --config={tmp_path}/mine.py:tiny (it holds mine.py)")
    # A syntax error in a module the config imports names that module.
    (tmp_path / "helper.py").write_text("x = (\n")
    (tmp_path / "uses.py").write_text("import helper\n")
    try:
        compile((tmp_path / "helper.py").read_text(), str(tmp_path / "helper.py"), "exec")
    except SyntaxError as e:
        caught = e
    assert say("--config", str(tmp_path / "uses.py"), error=caught).startswith(
        f"--config={tmp_path}/uses.py: {str(tmp_path / 'helper.py')!r}, which the config "
        "file imports, has a syntax error ('(' was never closed, line 1)")
    assert "line None" not in say(f"--config={tmp_path}/uses.py",
                                  error=SyntaxError("source code string cannot contain null "
                                                    "bytes"))
    # A missing file; a file without get_config; get_config's own failure.
    assert say("--config=configs/nope.py").startswith(
        "--config=configs/nope.py: there is no file 'configs/nope.py'")
    missing = AttributeError("module 'config_config' has no attribute 'get_config'")
    assert "defines no get_config()" in say(f"--config={tmp_path}/notes.py", error=missing)
    (tmp_path / "boom.py").write_text("def get_config(arg=None):\n    return world\n")
    try:
        exec(compile((tmp_path / "boom.py").read_text() + "get_config()\n",
                     str(tmp_path / "boom.py"), "exec"), {})
    except NameError as e:
        caught = e
    assert say(f"--config={tmp_path}/boom.py", error=caught) == (
        f"--config={tmp_path}/boom.py: building the config failed at {tmp_path}/boom.py:2: "
        "NameError: name 'world' is not defined")
    # An override's value as given, even with ': ' in it.
    error = ValueError("flag --config.train.steps=a: b: invalid literal for int()")
    assert say("--config=configs/mae.py", "--config.train.steps", "a: b", error=error) == (
        "--config.train.steps=a: b: train.steps takes a whole number (its value is 200)")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_checkpoints_and_exits_as_the_signal_would(signum, tmp_path):
    proc = _run_main(["--config=configs/mae.py:tiny,steps=100000", f"--workdir={tmp_path}",
                      "--config.train.checkpoint_every=100000", *FAST_FLAGS])
    deadline = time.time() + 240
    while time.time() < deadline:
        rows = read_metrics(tmp_path) if os.path.exists(tmp_path / "metrics.jsonl") else []
        if any(r.get("step", 0) >= 3 for r in rows):
            break
        time.sleep(0.5)
    proc.send_signal(signum)  # SIGINT: a first Ctrl-C
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, out  # so `stage1 && stage2` does not go on
    saved = [int(n) for n in os.listdir(tmp_path / "checkpoints") if n.isdigit()]
    assert len(saved) == 1 and saved[0] >= 3
    assert "rerun the same command to resume" in out


@pytest.mark.slow
def test_killed_process_resumes_bitwise_identically(tmp_path):
    args = ["--config=configs/mae.py:tiny,steps=200", "--config.train.checkpoint_every=20",
            "--config.data.eval.kind=", *FAST_FLAGS]
    straight = _run_main([*args, f"--workdir={tmp_path / 'a'}"])
    out, _ = straight.communicate(timeout=600)
    assert straight.returncode == 0, out

    killed = _run_main([*args, f"--workdir={tmp_path / 'b'}"])
    first = tmp_path / "b" / "checkpoints" / "20"
    deadline = time.time() + 300
    while not first.exists() and time.time() < deadline:
        time.sleep(0.02)
    assert killed.poll() is None, "the run ended before it could be killed"
    killed.kill()  # SIGKILL: no clean-up, possibly in the middle of a later save
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    done = [r["step"] for r in read_metrics(tmp_path / "b") if "loss" in r]
    assert done[-1] < 200

    resumed = _run_main([*args, f"--workdir={tmp_path / 'b'}"])
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert "resuming from" in out
    config = tiny_config("mae", 200)
    assert_trees_equal(restore_params(config, tmp_path / "a"),
                       restore_params(config, tmp_path / "b"))


def test_a_stage_stopped_by_a_signal_ends_the_recipe(tmp_path, monkeypatch):
    from configs import quickstart

    ran = []

    def run(config, workdir):
        ran.append(config.task)
        raise host.StopRequestedError(7, 2)

    monkeypatch.setattr(loop, "run", run)
    with pytest.raises(host.StopRequestedError, match="stopped at step 7 after signal 2"):
        stages.run(quickstart.get_config("steps1=10,steps2=10"), str(tmp_path))
    assert ran == ["mae"] and not (tmp_path / "results.json").exists()


def test_closed_loop_callbacks_after_an_unreadable_checkpoint_are_not_printed(monkeypatch):
    import logging as std_logging
    import types

    from cacophony_jax import main

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    handlers = std_logging.getLogger().handlers + [main.logging.get_absl_handler()]
    filters = {handler: list(handler.filters) for handler in handlers}
    try:
        main._quiet_libraries()
        for error in (RuntimeError("Event loop is closed"), RuntimeError("other"),
                      Exception("Encountered error while reading array index: (slice(0, 2)")):
            sys.unraisablehook(types.SimpleNamespace(exc_value=error))
        # asyncio's event loop of every save, at --verbosity=1: not shown; warnings are.
        handler = main.logging.get_absl_handler()

        def record(level):
            return std_logging.LogRecord("asyncio", level, "/x/asyncio/selector_events.py",
                                         54, "Using selector: EpollSelector", (), None)
        assert not handler.filter(record(std_logging.DEBUG))
        assert handler.filter(record(std_logging.WARNING))
    finally:
        for handler, kept in filters.items():
            handler.filters[:] = kept
    # TensorStore's late completions of a failed restore: dropped; anything else: kept.
    assert [str(u.exc_value) for u in seen] == ["other"]


def test_a_second_run_on_a_busy_workdir_stops_before_touching_it(tmp_path):
    import fcntl

    (tmp_path / ".lock").write_text("pid 4242 on elsewhere\n")
    with open(tmp_path / ".lock") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a run in another process
        with pytest.raises(host.WorkdirBusyError,
                           match="in use by pid 4242 on elsewhere.*if that machine went down"):
            loop.run(tiny_config("mae", 2), str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [".lock"]  # nothing written


def test_a_collective_failed_by_a_gone_process_is_named():
    from cacophony_jax import main

    hint = main._peer_hint(RuntimeError("Gloo all-reduce failed: Connection closed by peer"))
    assert "one of them is gone" in hint and "rerun every process" in hint
    assert main._peer_hint(RuntimeError("[enforce fail] Connection reset by peer")) == hint
    assert main._peer_hint(ValueError("shapes do not match")) is None


_RAISING_RUN = """
import sys
import jax
from absl import app
from cacophony_jax import main
from cacophony_jax.train import loop

SAID = sys.argv[3]

def run(config, workdir):
    raise jax.errors.JaxRuntimeError(SAID)

loop.run = run
sys.argv = ["main", "--config=" + sys.argv[2], "--workdir=" + sys.argv[1]]
app.run(main.main, flags_parser=main._parse_flags)
"""
_OOM = ("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 43.45GiB with allocator "
        "GPU_0_bfc on device 0.")


@pytest.mark.parametrize("config,said", [
    ("configs/mae.py:tiny", _OOM + "\nBFC allocator summary ..."),
    ("configs/quickstart.py", _OOM + "\nBFC allocator summary ..."),
    ("configs/mae.py:tiny", "INTERNAL: something else broke")])
def test_out_of_memory_ends_with_one_line_naming_the_batch_and_the_fixes(tmp_path, config,
                                                                          said):
    """XLA's out-of-memory error (with its allocator dump) becomes one error line with
    the per-device batch and what lowers memory (in a multi-stage recipe, the stage's
    own settings); other runtime errors keep their traceback."""
    from configs import mae, quickstart
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device
    done = subprocess.run([sys.executable, "-c", _RAISING_RUN, str(tmp_path), config, said],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    if not said.startswith(_OOM):
        assert done.returncode == 1 and "Traceback" in done.stderr
        assert "INTERNAL: something else broke" in done.stderr
        return
    if config.startswith("configs/quickstart"):  # its first stage runs out
        name = quickstart.get_config().stage_order[0]
        where, key = f"stage {name!r}: ", f"stages.{name}."
        batch = quickstart.get_config().stages[name].data.global_batch_size
    else:
        where, key, batch = "", "", mae.get_config("tiny").data.global_batch_size
    lines = [line for line in done.stderr.splitlines() if "error:" in line]
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert lines == [
        f"error: {where}the training step ran out of device memory ({_OOM}). To fit: lower "
        f"{key}data.global_batch_size ({batch}: {batch:g} per device); set {key}model.remat="
        "dots (recomputes some activations: +3 % FLOPs). Per-device memory by batch: "
        "docs/scaling.md, \"Per-device batch and memory\"; benchmarks/train_step.py "
        "--sweep-batch measures it on your device."]


def test_out_of_memory_hint_tells_fragmentation_from_a_full_pool(monkeypatch):
    import ml_collections

    from cacophony_jax.train import memory_hint

    stage = ml_collections.ConfigDict({"data": {"global_batch_size": 256},
                                       "model": {"attention": "cudnn", "remat": "none"}})
    monkeypatch.delenv("XLA_PYTHON_CLIENT_ALLOCATOR", raising=False)
    error = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
                         "48.81GiB with allocator GPU_0_bfc on device 0.\nsummary ...")
    gib = 2**30
    # 60 GiB free in a 72 GiB pool, but no block of 48.81 GiB: fragmented.
    split = {"bytes_limit": 72 * gib, "bytes_in_use": 12 * gib,
             "largest_free_block_bytes": 40 * gib}
    text = memory_hint.message(error, stage, 1, "gpu", stats=split)
    assert "the pool had 60.0 GiB free but no block of 48.81 GiB (the largest was 40.0 GiB)" \
        in text
    assert text.index("fragmented") < text.index("data.global_batch_size")
    assert text.count("XLA_PYTHON_CLIENT_ALLOCATOR=cuda_async") == 1
    # Sizes as XLA and PJRT print them.
    for said, size in (("allocate 7406166528 bytes.", "6.90"),
                       ("Failed to allocate request for 61.2G", "61.20"),
                       ("trying to allocate 62.5GiB", "62.50")):
        big = {"bytes_limit": 80 * gib, "bytes_in_use": 10 * gib,
               "largest_free_block_bytes": 5 * gib}
        assert f"no block of {size} GiB" in memory_hint.message(
            RuntimeError(f"RESOURCE_EXHAUSTED: {said}"), stage, 1, "gpu", stats=big)
    # Not on a TPU, not under CUDA's allocator, and a pool that has not grown to its
    # limit (no preallocation) counts only what it holds as free.
    assert "fragmented" not in memory_hint.message(error, stage, 1, "tpu", stats=split)
    monkeypatch.setenv("XLA_PYTHON_CLIENT_ALLOCATOR", "cuda_async")
    text = memory_hint.message(error, stage, 1, "gpu", stats=split)
    assert "fragmented" not in text and "ALLOCATOR=cuda_async" not in text  # already set
    monkeypatch.delenv("XLA_PYTHON_CLIENT_ALLOCATOR")
    grown = {**split, "pool_bytes": 50 * gib}
    assert "fragmented" not in memory_hint.message(error, stage, 1, "gpu", stats=grown)
    assert "largest free block" not in memory_hint.pool_summary(
        {**split, "largest_free_block_bytes": 0})
    assert memory_hint.failed_device(error, ["d0", "d1"]) == "d0"
    assert memory_hint.failed_device(RuntimeError("allocator GPU_1_bfc"), ["d0", "d1"]) == "d1"
    assert memory_hint.failed_device(RuntimeError("allocator GPU_5_bfc"), ["d0"]) == "d0"
    # Not enough free at all: the usual advice, with the pool's state.
    full = {"bytes_limit": 72 * gib, "bytes_in_use": 40 * gib,
            "largest_free_block_bytes": 32 * gib}
    text = memory_hint.message(error, stage, 1, "gpu", stats=full)
    assert "fragmented" not in text
    assert "pool 72.0 GiB, 40.0 GiB in use, largest free block 32.0 GiB" in text
    # A device without a pool (CPU), or stats that cannot be read, change nothing.
    plain = memory_hint.message(error, stage, 1, "gpu")
    assert memory_hint.message(error, stage, 1, "gpu", stats=None) == plain
    assert memory_hint.pool_summary({}) == "" and memory_hint.pool_summary(None) == ""
    assert memory_hint.peak_summary({"bytes_limit": 72 * gib, "peak_bytes_in_use": 54 * gib}) \
        == "peak 54.0 GiB of the 72.0 GiB pool (75 %)"
    assert memory_hint.peak_summary({"bytes_limit": 72 * gib}) == ""

    class Broken:
        def memory_stats(self):
            raise RuntimeError("not supported")

    class NoPool:
        def memory_stats(self):
            return None

    assert memory_hint.device_memory(Broken()) is None
    assert memory_hint.device_memory(NoPool()) is None


def test_out_of_memory_hint_on_a_gpu_names_the_gpu_settings():
    import ml_collections

    from cacophony_jax.train import memory_hint

    def stage(attention="xla", remat="none", batch=2048):
        return ml_collections.ConfigDict({"data": {"global_batch_size": batch},
                                          "model": {"attention": attention, "remat": remat}})

    error = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9GiB\nx")
    assert memory_hint.is_out_of_memory(error)
    assert not memory_hint.is_out_of_memory(RuntimeError("INTERNAL: cuDNN failed"))
    assert not memory_hint.is_out_of_memory(ValueError("out of memory"))  # not XLA's
    assert memory_hint.is_out_of_memory(RuntimeError(
        "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory "
        "space hbm. Used 17.2G of 15.75G hbm."))
    # A full disk under a checkpoint save is RESOURCE_EXHAUSTED too, but not memory.
    assert not memory_hint.is_out_of_memory(RuntimeError(
        'RESOURCE_EXHAUSTED: Error writing "opt_state" in OCDBT database at local file '
        '"ckpt/4": Failed to write 198873 bytes to file 9: No space left on device'))
    text = memory_hint.message(error, stage(), 8, "gpu")
    assert "(2048: 256 per device)" in text and "model.attention=cudnn" in text
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION" in text and "ALLOCATOR=cuda_async" in text
    assert "\n" not in text and "allocate 9GiB)" in text and "model.remat=dots" in text
    assert "cuda_async" not in memory_hint.message(error, stage(batch=64), 4, "tpu")
    # What is already set is not suggested again; remat goes one step further.
    text = memory_hint.message(error, stage("cudnn", "dots"), 1, "gpu")
    assert "model.attention" not in text and "model.remat=full" in text
    assert "model.remat" not in memory_hint.message(error, stage("cudnn", "full"), 1, "gpu")
    assert "model.remat=dots" in memory_hint.message(error, stage(remat="minimal"), 1, "gpu")
    # A multi-stage recipe's stage: its settings by their full names.
    text = memory_hint.message(error, stage(batch=32), 1, "cpu", "cacophony")
    assert text.startswith("stage 'cacophony': the training step ran out of device memory")
    assert "lower stages.cacophony.data.global_batch_size (32: 32 per device)" in text
    # The section the line points to exists.
    with open(os.path.join(ROOT, "docs", "scaling.md"), encoding="utf-8") as doc:
        assert "**Per-device batch and memory" in doc.read()
