"""Smoke tests of the benchmark suite runner, the attention parity check and the GPU
profile and kernel-timing tools, at tiny sizes on CPU."""

import json
import pathlib
import sys

import jax
import pytest

from benchmarks import attention_parity, norm_kernels, profile_summary, suite, tables
from tests.helpers import cudnn_stand_in


@pytest.mark.slow
def test_suite_trains_through_the_real_pipeline_and_summarises(tmp_path, capsys):
    out = tmp_path / "suite"
    rows = suite.main(["--out", str(out), "--parts", "train-mae", "--variant", "tiny",
                       "--batch", "8", "--train-steps", "6", "--log-every", "2",
                       "--clips", "8", "--clip-seconds", "1", "--workers", "0",
                       "--attention", "", "--peak-tflops", "2", "--train-profile-steps", "2"])
    (row,) = rows
    assert row["kind"] == "train" and row["stage"] == "mae" and row["last_step"] == 6
    assert row["windows"] == 2  # log windows ending at steps 4 and 6 (1 and 2 skipped)
    assert row["mfu"] == pytest.approx(row["model_tflops_per_device"] / 2)
    assert 0 <= row["input_wait_fraction"] <= 1 and row["failed_records"] == 0
    # Two traced steps of the loop, summarised: how busy the device was between them.
    assert 0 < row["loop_busy_fraction"] <= 1 and row["loop_profile_ms"]
    assert "| mae tiny | 8 | 0 |" in (out / "summary.md").read_text()
    assert (out / "logs" / "train-mae.log").read_text().count("step 6/6") == 1
    capsys.readouterr()
    suite.main(["--summarize", str(out / "rows.jsonl")])
    assert "| mae tiny |" in capsys.readouterr().out


def test_allocators_part_trains_each_stage_under_each_allocator(tmp_path):
    args = suite.parse_args(["--out", str(tmp_path), "--allocators", "bfc,cuda_async",
                             "--attention", "xla"])
    commands = suite.plan(args, tmp_path)["allocators"]
    assert [c.label for c in commands] == ["train-mae-bfc", "train-mae-cuda_async",
                                           "train-cacophony-bfc", "train-cacophony-cuda_async"]
    for command in commands:
        allocator = command.label.rsplit("-", 1)[1]
        assert command.env == {"XLA_PYTHON_CLIENT_ALLOCATOR": allocator}
        assert f"--workdir={tmp_path / command.label}" in command.argv
        assert command.shell().startswith(f"XLA_PYTHON_CLIENT_ALLOCATOR={allocator} ")
    # The plain training parts keep their own workdirs and the caller's allocator.
    (plain,) = suite.plan(args, tmp_path)["train-mae"]
    assert plain.env == {} and f"--workdir={tmp_path / 'train-mae'}" in plain.argv
    row = {"kind": "train", "stage": "mae", "variant": "base", "batch": 192, "workers": 8,
           "last_step": 40, "examples_per_sec": 1000.0, "mfu": 0.33,
           "model_tflops_per_device": 330.0, "input_wait_fraction": 0.01,
           "failed_records": 0, "allocator": "cuda_async"}
    assert "| mae base, cuda_async allocator | 192 | 8 | 40 |" in tables.summarize([row])
    assert "| mae base | 192 |" in tables.summarize([{**row, "allocator": ""}])


def test_suite_plan_and_errors(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit, match="no rows file .*rows.jsnl"):  # a typo, not "no rows"
        suite.main(["--summarize", str(tmp_path / "rows.jsnl")])
    # The default attention follows the machine: cuDNN only where NVIDIA devices exist.
    monkeypatch.setattr(suite.glob, "glob", lambda pattern: [])
    assert suite.parse_args([]).attention == "xla"
    monkeypatch.setattr(suite.glob, "glob", lambda pattern: ["/dev/nvidia0"])
    assert suite.parse_args([]).attention == "cudnn"
    monkeypatch.undo()
    suite.main(["--out", str(tmp_path), "--parts", "all", "--dry-run", "--attention", "cudnn"])
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 21 and not (tmp_path / "rows.jsonl").exists()
    assert "attention_parity.py" in printed[0]
    assert sum("--fuse-qkv" in line for line in printed) == 2
    assert sum("--fused-norm" in line for line in printed) == 2
    assert sum("norm_kernels.py" in line for line in printed) == 1
    assert any("--attention xla" in line for line in printed)
    assert any("--config.model.attention=cudnn" in line and "mae.py:base" in line
               for line in printed)
    with pytest.raises(ValueError, match="unknown part"):
        suite.main(["--out", str(tmp_path), "--parts", "steps-mea"])
    with pytest.raises(ValueError, match="attention part .* --attention cudnn"):
        suite.main(["--out", str(tmp_path), "--parts", "attention", "--attention", "xla"])
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in [
        {"step": 1, "loss": 1.0, "perf/first_step_seconds": 30.0}, *(
            {"step": s, "loss": 1.0, "perf/examples_per_sec": e,
             "perf/input_wait_fraction": 0.1}
            for s, e in ((10, 50.0), (20, 100.0), (30, 200.0)))]) + '\n{"step": 4')
    steady = suite.steady_state(metrics)  # the cut last line of a killed run is skipped
    assert steady["examples_per_sec"] == 150.0 and steady["windows"] == 2
    capsys.readouterr()
    assert suite.main(["--out", str(tmp_path), "--parts", "steps-mae,attention",
                       "--attention", "cudnn", "--budget", "20"]) == []
    assert capsys.readouterr().out.count("s of --budget left") == 2
    parity = {"stage": "mae", "variant": "base", "attention": "cudnn", "batch": 16,
              "loss_rel": 1e-4, "grad_rel": 3e-3, "grad_leaf_median_rel": 2e-3, "same": True}
    assert "| mae base, xla vs cudnn | 16 | 1.0e-04 | 3.0e-03 (2.0e-03) | same |" in (
        tables.summarize([parity]))
    profiled = {"stage": "mae", "attention": "cudnn", "batch": 256, "profile": {
        "busy_fraction": 0.95, "product_tflops": 612.0,
        "categories": {"matmul": {"ms_per_step": 120.0}, "fusion/other": {"ms_per_step": 60.5}}}}
    assert "| mae cudnn | 256 | 95.0 % | 120.0 | 0.0 | 60.5 | 0.0 | 0.0 | 612 |" in (
        tables.summarize([profiled]))


@pytest.mark.slow
def test_attention_parity_runs_both_stages_through_the_fused_path(monkeypatch):
    """On CPU the fused path is the cuDNN stand-in (cuDNN's shape rules, XLA's maths),
    so both runs must agree to float32 rounding; the MAE encoder's odd visible-patch
    count goes through the padding."""
    calls = []
    monkeypatch.setattr(jax.nn, "dot_product_attention", cudnn_stand_in(calls))
    rows = attention_parity.main(["--variant", "tiny", "--batch", "8", "--clip-seconds", "1"])
    assert [r["stage"] for r in rows] == ["mae", "cacophony"] and "cudnn" in calls
    for row in rows:
        assert row["same"] and row["loss_rel"] < 1e-5 and row["grad_rel"] < 1e-4
        assert row["grad_leaf_median_rel"] < 1e-4
        assert len(row["loss_fused"]) == 2 and row["loss_fused"][1] != row["loss_fused"][0]


@pytest.mark.slow
def test_attention_parity_reports_a_difference(monkeypatch):
    real = jax.nn.dot_product_attention

    def wrong(query, key, value, mask=None, implementation=None, **kwargs):
        if implementation == "cudnn":  # forgets the mask, given either way
            mask = None
            kwargs.pop("key_value_seq_lengths", None)
            kwargs.pop("is_causal", None)
        return real(query, key, value, mask=mask, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", wrong)
    with pytest.raises(ValueError, match="trains differently"):
        attention_parity.main(["--stage", "cacophony", "--variant", "tiny", "--batch", "8",
                               "--batches", "1", "--clip-seconds", "1"])


def test_suite_command_environment_appends_xla_flags(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_a=1")
    show = suite.Command("show", [sys.executable, "-c",
                                  "import os; print('got', os.environ['XLA_FLAGS'], "
                                  "os.environ['OTHER'])"],
                         env={"XLA_FLAGS": "--xla_b=", "OTHER": "x y"})
    assert suite.run_command(show, tmp_path, timeout=60) == 0
    out = capsys.readouterr().out
    assert "== show: XLA_FLAGS=--xla_b= OTHER='x y' " in out
    assert "got --xla_a=1 --xla_b= x y" in out


def test_suite_stops_a_silent_command_at_its_timeout(tmp_path, capsys):
    sleeper = suite.Command("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"])
    assert suite.run_command(sleeper, tmp_path, timeout=0.5) != 0
    assert "sleeper: stopped after 0.5 s" in capsys.readouterr().out


# ---- profile_summary ---------------------------------------------------------------

def _xevent(metadata_id: int, start_us: float, duration_us: float, hlo_op: str = "") -> str:
    stats = f' stats {{ metadata_id: 1 str_value: "{hlo_op}" }}' if hlo_op else ""
    return (f"events {{ metadata_id: {metadata_id} offset_ps: {int(start_us * 1e6)} "
            f"duration_ps: {int(duration_us * 1e6)}{stats} }}")


def _xline(line_id: int, name: str, *events: str) -> str:
    return f'lines {{ id: {line_id} name: "{name}" timestamp_ns: 1000 {" ".join(events)} }}'


# A GPU trace as the CUPTI tracer lays it out: kernels on "Stream #N" lines (two of
# them overlapping), the same time again on the derived "XLA Ops" line, and a CUPTI
# overhead line; times in microseconds here.
_KERNELS = ("nvjet_hsh_256x128_2x1_v_bz_coopA_TNN",
            "cudnn_generated_fort_native_sdpa_sm90_flash_fprop", "loop_add_fusion",
            "ncclDevKernel_AllReduce_Sum_bf16_RING_LL", "custom-call.3")
_GPU_XSPACE = "planes { id: 1 name: \"/device:GPU:0\" " + " ".join([
    _xline(1, "Stream #7(Kernel)", _xevent(1, 0, 6, "custom-call.3"),
           _xevent(2, 6, 2, "custom-call.9"), _xevent(3, 8, 1, "loop_add_fusion"),
           _xevent(1, 12, 6, "custom-call.3")),
    _xline(2, "Stream #9(MemcpyH2D,Kernel)", _xevent(4, 8.5, 1, "all-reduce.1")),
    _xline(3, "XLA Ops", _xevent(5, 0, 6)),
    _xline(4, "CUPTI overhead", _xevent(5, 0, 9)),
    *(f'event_metadata {{ key: {i} value {{ id: {i} name: "{name}" }} }}'
      for i, name in enumerate(_KERNELS, 1)),
    'stat_metadata { key: 1 value { id: 1 name: "hlo_op" } }',
]) + " }"
# A second GPU running the same program, listed first: only GPU 0 is read.
_GPU_XSPACE = ('planes { id: 2 name: "/device:GPU:1" '
               + _xline(1, "Stream #7(Kernel)", _xevent(1, 0, 6, "custom-call.3"))
               + ' event_metadata { key: 1 value { id: 1 name: "nvjet_hsh" } }'
               + ' stat_metadata { key: 1 value { id: 1 name: "hlo_op" } } } ' + _GPU_XSPACE)


def test_profile_summary_sorts_gpu_kernels_and_counts_overlap_once():
    from jax.profiler import ProfileData
    profile = ProfileData.from_serialized_xspace(
        ProfileData.text_proto_to_serialized_xspace(_GPU_XSPACE))
    events, source = profile_summary.device_events(profile)
    assert len(events) == 5 and "Stream #7(Kernel)" in source and "XLA Ops" not in source
    assert source.startswith("/device:GPU:0")
    summary = profile_summary.summarize(events, steps=2, model_gflop=10.0)
    ms = {k: c["ms_per_step"] for k, c in summary["categories"].items()}
    assert ms == pytest.approx({"matmul": 6e-3, "attention": 1e-3, "fusion/other": 5e-4,
                                "collective": 5e-4})
    # Busy: 0-9.5 us (the all-reduce overlaps the fusion) and 12-18 us; span 18 us.
    assert summary["busy_ms_per_step"] == pytest.approx(15.5e-3 / 2)
    assert summary["span_ms_per_step"] == pytest.approx(18e-3 / 2)
    # 2 steps x 10 GFLOP in 14 us of products and attention.
    assert summary["product_tflops"] == pytest.approx(20e9 / 14e-6 / 1e12)
    assert summary["top_ops"][0] == pytest.approx(
        {"category": "matmul", "op": "custom-call.3", "ms_per_step": 6e-3,
         "calls_per_step": 1.0, "share": 12 / 16})
    text = profile_summary.format_summary(summary, source)
    assert "matmul" in text and "model TFLOP/s while running" in text
    with pytest.raises(ValueError, match="no device events"):
        profile_summary.summarize([])
    with pytest.raises(FileNotFoundError, match="profile_steps"):
        profile_summary.newest_trace(pathlib.Path(__file__).parent / "fixtures" / "official")


# Two XLA:CPU fusions as the optimised HLO prints them (backend configs left out): one
# around a matrix product (YNNPACK), one around a reduction; their events look alike.
_CPU_HLO = """\
%add.1 (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %add.2 = f32[] add(%x, %y)
}

%fused_computation.1 (param_0: f32[8,4], param_1: f32[4,2]) -> f32[8,2] {
  %param_0 = f32[8,4]{1,0} parameter(0)
  %param_1 = f32[4,2]{1,0} parameter(1)
  ROOT %dot.1 = f32[8,2]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}
}

%fused_computation.2 (param_0.1: f32[8,2]) -> f32[8] {
  %param_0.1 = f32[8,2]{1,0} parameter(0)
  %constant.1 = f32[] constant(0)
  ROOT %reduce.1 = f32[8]{0} reduce(%param_0.1, %constant.1), dimensions={1}, to_apply=%add.1
}

ENTRY %main.3 (a: f32[8,4], b: f32[4,2]) -> f32[8] {
  %a = f32[8,4]{1,0} parameter(0)
  %b = f32[4,2]{1,0} parameter(1)
  %ynn_fusion.1 = f32[8,2]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_computation.1
  ROOT %ynn_fusion.2 = f32[8]{0} fusion(%ynn_fusion.1), kind=kCustom, calls=%fused_computation.2
}
"""


def test_profile_summary_sorts_cpu_fusions_by_the_hlo():
    """XLA:CPU's products run in `ynn_fusion.N` kernels, as do reductions: only the
    step's HLO tells them apart, and without it no products' rate is made up."""
    assert profile_summary.product_ops(_CPU_HLO) == {"ynn_fusion.1": "matmul",
                                                     "dot.1": "matmul"}
    events = [profile_summary.Event("ynn_fusion.1", "ynn_fusion.1", 0, 3000),
              profile_summary.Event("ynn_fusion.2", "ynn_fusion.2", 3000, 1000)]
    sorted_ = profile_summary.summarize(events, model_gflop=1e-3, host=True,
                                        products=profile_summary.product_ops(_CPU_HLO))
    assert sorted_["categories"]["matmul"]["ms_per_step"] == pytest.approx(3e-3)
    assert sorted_["product_tflops"] == pytest.approx(1e6 / 3e-6 / 1e12)
    assert "sorted here by the step's HLO" in sorted_["note"]
    unsorted = profile_summary.summarize(events, model_gflop=1e-3, host=True)
    assert set(unsorted["categories"]) == {"fusion/other"}
    assert "product_tflops" not in unsorted and "--hlo" in unsorted["note"]
    text = profile_summary.format_summary(unsorted)
    assert "meant for GPU profiles" in text and "TFLOP/s" not in text
    # A real XLA:CPU compile: its product is found, whatever XLA named it.
    compiled = jax.jit(lambda a, b: (a @ b).sum(-1)).lower(
        jax.ShapeDtypeStruct((64, 32), "float32"),
        jax.ShapeDtypeStruct((32, 16), "float32")).compile()
    assert "matmul" in profile_summary.product_ops(compiled.as_text()).values()


def test_norm_kernels_times_xla_and_the_kernels_and_compares_gradients(tmp_path, capsys):
    """A CPU smoke run (interpreted kernels): one XLA row, one per launch setting,
    with gradients that match XLA's and a summary table."""
    out = tmp_path / "rows.jsonl"
    rows = norm_kernels.main(["--tokens", "24", "--width", "20", "--dtype", "float32",
                              "--rows", "2,4", "--iters", "1", "--json", str(out)])
    assert [(r["norm"], r["rows"]) for r in rows] == [("xla", 0), ("kernels", 2),
                                                      ("kernels", 4)]
    assert all(r["max_grad_rel"] < 1e-5 and r["grad_ms"] > 0 for r in rows)
    assert "| kernels, rows 4, warps 4 | 24 x 20 |" in tables.summarize(
        tables.read_rows([out]))


def test_profile_summary_lists_kernels_inside_command_buffers_by_name():
    """XLA:GPU runs most of a step as one `command_buffer_N` op: its kernels are listed
    under their own names, other ops under the op's."""
    Event = profile_summary.Event
    events = [Event("loop_add_fusion_3", "command_buffer_1", 0, 4000),
              Event("loop_add_fusion_3", "command_buffer_1", 5000, 4000),
              Event("nvjet_hsh_256x128", "command_buffer_1", 10000, 3000),
              Event("nvjet_hsh_256x128", "custom-call.7", 14000, 2000),
              Event("memcpy", "", 17000, 1000)]
    ops = {(o["category"], o["op"]): o["ms_per_step"]
           for o in profile_summary.summarize(events)["top_ops"]}
    assert ops == pytest.approx({("fusion/other", "loop_add_fusion_3"): 8e-3,
                                 ("matmul", "nvjet_hsh_256x128"): 3e-3,
                                 ("matmul", "custom-call.7"): 2e-3, ("copy", "memcpy"): 1e-3})


def test_output_piped_into_a_reader_that_stops_early_ends_quietly():
    import subprocess

    root = pathlib.Path(__file__).resolve().parents[1]
    script = ("from benchmarks import report\n"
              "report.run(lambda: [print('row ' * 25) for _ in range(100_000)])\n")
    with subprocess.Popen([sys.executable, "-c", script], cwd=root, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as proc:
        proc.stdout.readline()
        proc.stdout.close()  # as `| head -1` does
        err = proc.stderr.read().decode()
    assert proc.returncode == 1 and err == "", err
