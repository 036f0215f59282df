"""Smoke tests of the benchmark scripts at tiny sizes (so they do not rot), and checks
of their arithmetic with hand-computed values."""

import json
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from benchmarks import (
    accounting,
    aot_compile,
    compile_targets,
    cpu_time,
    gpu_targets,
    host_pipeline,
    input_pipeline,
    step_rows,
    tables,
    train_step,
)
from cacophony_jax.data import spec

# ---- input_pipeline ----------------------------------------------------------------


def test_virtual_size_repeats_the_source():
    base = types.SimpleNamespace(name="b", class_names=("x",))
    records = [{"id": "a"}, {"id": "b"}, {"id": "c"}]
    source = host_pipeline.VirtualSize(_ListSource(records, base), 10)
    assert len(source) == 10
    assert [source[i]["id"] for i in (0, 4, 8, 9)] == ["a", "b", "c", "a"]
    assert source.class_names == ("x",)
    # Never smaller than the source itself.
    assert len(host_pipeline.VirtualSize(_ListSource(records, base), 2)) == 3


class _ListSource:
    def __init__(self, records, meta):
        self._records, self.name, self.class_names = records, meta.name, meta.class_names

    def __len__(self):
        return len(self._records)

    def __getitem__(self, i):
        return self._records[i]


def test_cpu_seconds_counts_work_done():
    before = cpu_time.cpu_seconds()
    end = time.process_time() + 0.05
    while time.process_time() < end:
        pass
    assert cpu_time.cpu_seconds() - before >= 0.05


def test_format_row_says_whether_the_target_is_met():
    row = {"bench": "wav", "config": "c", "clips_per_s": 3000.0, "cores": 2,
           "clips_per_s_per_core": 1500.0, "clips_per_cpu_s": 1600.0}
    assert "(target 1500: met)" in input_pipeline.format_row(row)
    row.update(bench="frontend", clips_per_s_per_core=699.0)
    assert "(target 700: missed)" in input_pipeline.format_row(row)


def test_input_pipeline_runs_every_bench(tmp_path):
    rows = input_pipeline.main([
        "--num-clips", "4", "--clip-seconds", "1", "--batch", "2", "--seconds", "0.2",
        "--text-length", "0,16", "--virtual-size", "100", "--iters", "1",
        "--sub-batches", "1,2", "--data-dir", str(tmp_path),
        "--json", str(tmp_path / "rows.jsonl")])
    written = (tmp_path / "rows.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in written] == rows
    kinds = [r["bench"] for r in rows]
    assert kinds == ["wav", "array_record"] * 2 + ["frontend"] * 2
    for row in rows:
        assert row["clips_per_s"] > 0 and row["cores"] >= 1
        assert row["clips_per_s_per_core"] == pytest.approx(row["clips_per_s"] / row["cores"])
    assert "text 16" in rows[2]["config"] and "sub_batches 2" in rows[-1]["config"]


def test_input_pipeline_rejects_an_unknown_bench():
    with pytest.raises(ValueError, match="unknown"):
        input_pipeline.main(["--bench", "wave"])


# ---- train_step --------------------------------------------------------------------


def test_step_flops_counts_one_devices_share():
    mesh = jax.make_mesh((8,), ("d",))
    x = jax.ShapeDtypeStruct((64, 32), jnp.float32,
                             sharding=NamedSharding(mesh, PartitionSpec("d")))
    w = jax.ShapeDtypeStruct((32, 16), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
    compiled = jax.jit(lambda a, b: a @ b).lower(x, w).compile()
    # Each device multiplies its 8 x 32 rows by 32 x 16: 2 * 8 * 32 * 16 FLOPs.
    assert accounting.step_flops(compiled) == 2 * 8 * 32 * 16


@pytest.mark.parametrize("kind,tflops", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("TPU v4", 275.0), ("TPU v5 lite", 197.0),
    ("TPU v5p", 459.0), ("TPU v6 lite", 918.0)])
def test_peak_table_matches_device_kinds(kind, tflops):
    device = types.SimpleNamespace(platform="gpu", device_kind=kind)
    peak, source = accounting.peak_flops_per_device([device], "bfloat16")
    assert peak == tflops * 1e12 and "datasheet" in source


def test_unknown_accelerator_asks_for_a_peak():
    device = types.SimpleNamespace(platform="gpu", device_kind="Mystery 9000")
    peak, source = accounting.peak_flops_per_device([device], "bfloat16")
    assert np.isnan(peak) and "--peak-tflops" in source
    assert accounting.peak_flops_per_device([device], "bfloat16", 100.0)[0] == 100e12


def test_memory_total_counts_donated_buffers_once():
    stats = types.SimpleNamespace(argument_size_in_bytes=100, output_size_in_bytes=60,
                                  alias_size_in_bytes=50, temp_size_in_bytes=30,
                                  generated_code_size_in_bytes=5)
    compiled = types.SimpleNamespace(memory_analysis=lambda: stats)
    assert accounting.memory_bytes(compiled)["total"] == 100 + 60 - 50 + 30 + 5


def test_random_batch_follows_the_contract():
    config = train_step.make_config("cacophony", "tiny", 8, clip_seconds=1.0, text_length=16)
    built = train_step.build_step(config)
    batch = train_step.random_batch(built)
    spec.check_batch(batch, spec.TRAIN_KEYS)
    ids, mask = batch["text_ids"], batch["text_mask"]
    assert (ids[:, 0] == spec.BOS_ID).all()
    length = mask.sum(axis=1)  # bos .. eos inclusive
    assert (ids[np.arange(8), length - 1] == spec.EOS_ID).all()
    assert ((ids == spec.PAD_ID) == (mask == 0)).all()
    assert ids.max() < built.vocab_size


def test_measured_cpu_peak_is_positive():
    assert accounting.measured_matmul_peak(jax.devices(), "float32", size=64, reps=1) > 0


def _step_row(**memory) -> dict:
    """A train_step.py row with the given memory fields (for the printed line)."""
    return {"stage": "mae", "variant": "base", "devices": 1, "batch": 64, "dtype": "bfloat16",
            "scan": False, "remat": "none", "attention": "cudnn", "sam": False,
            "frontend_sub_batches": 1, "step_s": 0.1, "examples_per_s": 640.0,
            "model_flops_per_example": 3e11, "tflops_per_device": 192.0, "mfu": 0.19,
            "compile_s": 20.0, "first_loss": 1.5, "xla_flags": "",
            "memory": {"total": 10 * 2**30, **memory}}


def test_a_row_never_reports_an_earlier_rows_peak_memory():
    # The device's high-water mark rose during the row: that is the row's peak.
    first = step_rows.row_peak_memory({"peak_bytes_in_use": 0, "bytes_in_use": 0},
                                       {"peak_bytes_in_use": 40 * 2**30})
    assert first == {"peak_bytes_in_use": 40 * 2**30, "bytes_in_use_before": 0}
    # A smaller row after it leaves the mark where it was: not this row's peak.
    second = step_rows.row_peak_memory({"peak_bytes_in_use": 40 * 2**30},
                                        {"peak_bytes_in_use": 40 * 2**30})
    assert second == {"process_peak_bytes_in_use": 40 * 2**30, "peak_not_attributable": True}
    assert step_rows.row_peak_memory({}, {}) == {}  # CPU: no memory statistics
    assert "40960.0 MiB (peak)" in step_rows.format_row(_step_row(**first))
    line = step_rows.format_row(_step_row(**second))
    assert "10240.0 MiB (compiled; the process peak is an earlier row's)" in line
    assert "40960" not in line
    table = tables.summarize([_step_row(**first), _step_row(**second)])
    assert "| 40.0 |" in table and "| 10.0 (compiled) |" in table and "memory GiB" in table


def test_loss_flags_set_stage_twos_contrastive_loss():
    config = train_step.make_config("cacophony", "tiny", 64, loss_kind="sigmoid",
                                    loss_chunk_size=16)
    assert (config.loss.kind, config.loss.chunk_size) == ("sigmoid", 16)
    assert config.model.sigmoid_bias  # the sigmoid loss's learned bias comes with it
    plain = train_step.make_config("cacophony", "tiny", 64)
    assert (plain.loss.kind, plain.loss.chunk_size, plain.model.sigmoid_bias) == (
        "softmax", 0, False)
    assert step_rows.loss_fields(plain) == {"loss_kind": "softmax", "loss_chunk_size": 0}
    # Stage 1 has no contrastive loss: nothing to set, nothing in its rows.
    mae = train_step.make_config("mae", "tiny", 64, loss_kind="sigmoid", loss_chunk_size=16)
    assert "loss" not in mae and step_rows.loss_fields(mae) == {}
    with pytest.raises(ValueError, match="must be 0 .* or divide the global batch 64"):
        train_step.make_config("cacophony", "tiny", 64, loss_chunk_size=24)
    with pytest.raises(ValueError, match="add --stage cacophony"):
        train_step.main(["--stage", "mae", "--loss-chunk-size", "4"])
    with pytest.raises(ValueError, match="add --stage cacophony"):
        aot_compile.main(["--stage", "mae", "--loss-kind", "sigmoid"])
    with pytest.raises(ValueError, match="divide the global batch 8"):
        aot_compile.main(["--stage", "cacophony", "--variant", "tiny", "--per-device-batch",
                          "1", "--loss-chunk-size", "0,3"])


def test_train_step_runs_each_sweep_row_in_its_own_process(tmp_path, monkeypatch):
    """With several rows the script starts itself once per row (never a backend of
    its own, which would hold the accelerator) and collects their rows."""
    calls = []

    def fake_run(command, check):
        args = train_step.parse_args(command[2:])
        calls.append((command, args))
        if (args.stage, args.batch) == ("mae", 32):
            return types.SimpleNamespace(returncode=1)  # out of memory, say
        peak = args.peak_tflops or 0.25  # the first row "measures" 0.25
        row = {"stage": args.stage, "batch": args.batch, "dtype": "float32",
               "peak_tflops": peak, "peak_source": args.peak_source or "--peak-tflops"}
        with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")
        return types.SimpleNamespace(returncode=0)

    def no_backend(*a, **k):
        raise AssertionError("the parent process started a backend")

    monkeypatch.setattr(step_rows.subprocess, "run", fake_run)
    monkeypatch.setattr(train_step.jax, "devices", no_backend)
    out = tmp_path / "rows.jsonl"
    with pytest.raises(ValueError, match="1 of 4 rows failed: mae batch 32"):
        train_step.main(["--stage", "mae,cacophony", "--sweep-batch", "16,32",
                         "--variant", "tiny", "--json", str(out)])
    assert [(a.stage, a.batch) for _, a in calls] == [("mae", 16), ("mae", 32),
                                                     ("cacophony", 16), ("cacophony", 32)]
    for command, args in calls:
        assert command[0] == sys.executable and command[1].endswith("train_step.py")
        assert args.in_process and args.sweep_batch == "" and args.variant == "tiny"
        assert args.json != str(out)  # each row process writes a file of its own
    # Later rows are measured against the first row's peak, as in one process.
    assert calls[0][1].peak_tflops == 0
    assert (calls[2][1].peak_tflops, calls[2][1].peak_source) == (0.25, "--peak-tflops")
    rows = tables.read_rows([out])
    assert [(r["stage"], r["batch"]) for r in rows] == [("mae", 16), ("cacophony", 16),
                                                         ("cacophony", 32)]
    # Bad flags fail before any row starts.
    calls.clear()
    with pytest.raises(ValueError, match="unknown stage"):
        train_step.main(["--stage", "mae,cocophony", "--sweep-batch", "16,32"])
    assert not calls


@pytest.mark.slow
def test_train_step_measures_the_contrastive_stage(tmp_path, monkeypatch):
    # A device with memory statistics, as on a GPU: the row's peak is what it raised.
    stats = iter([{"peak_bytes_in_use": 0, "bytes_in_use": 0},
                  {"peak_bytes_in_use": 123 * 2**20, "bytes_in_use": 0}])
    monkeypatch.setattr(step_rows, "device_memory_stats", lambda device: next(stats))
    rows = train_step.main(["--stage", "cacophony", "--batch", "8", "--steps", "1",
                            "--warmup", "1", "--clip-seconds", "1", "--text-length", "16",
                            "--peak-tflops", "2", "--profile", str(tmp_path),
                            "--profile-steps", "2", "--loss-kind", "sigmoid",
                            "--loss-chunk-size", "4"])
    (row,) = rows
    assert (row["loss_kind"], row["loss_chunk_size"]) == ("sigmoid", 4)
    assert "sigmoid loss in chunks of 4 " in step_rows.format_row(row)
    # The traced steps' XLA ops (on CPU: host threads running them) were summarised.
    profile = row["profile"]
    assert profile["steps"] == 2 and profile["events"] > 0
    assert 0 < profile["busy_ms_per_step"] <= profile["span_ms_per_step"]
    assert sum(c["share"] for c in profile["categories"].values()) == pytest.approx(1.0)
    # The step's HLO sorted XLA:CPU's fused products as products.
    assert profile["categories"]["matmul"]["ms_per_step"] > 0
    assert "sorted here by the step's HLO" in profile["note"] and profile["product_tflops"] > 0
    assert (tmp_path / "cacophony-8").is_dir()
    assert row["devices"] == 8 and row["batch"] == 8 and row["peak_tflops"] == 2.0
    assert row["examples_per_s"] == pytest.approx(8 / row["step_s"])
    assert row["model_flops_per_example"] > 0
    # Per device: model FLOPs of the global step / devices / seconds.
    achieved = row["model_flops_per_example"] * 8 / 8 / row["step_s"] / 1e12
    assert row["tflops_per_device"] == pytest.approx(achieved)
    assert row["mfu"] == pytest.approx(row["tflops_per_device"] / 2.0)
    assert row["memory"]["total"] > 0
    assert row["memory"]["peak_bytes_in_use"] == 123 * 2**20


@pytest.mark.slow
def test_sweep_and_scan_keep_the_model_flops():
    plain = train_step.main(["--stage", "mae", "--sweep-batch", "8,16", "--steps", "1",
                             "--warmup", "0", "--clip-seconds", "1", "--peak-tflops", "1"])
    assert [r["batch"] for r in plain] == [8, 16]
    assert plain[1]["memory"]["total"] > plain[0]["memory"]["total"]
    # Per example the model work is the same (the optimiser's elementwise update is
    # not model work); XLA's count includes elementwise work, so it is larger.
    small, large = (r["model_flops_per_example"] for r in plain)
    assert large == small
    assert all(r["xla_flops_per_example"] > r["model_flops_per_example"] for r in plain)
    scanned = train_step.main(["--stage", "mae", "--batch", "8", "--steps", "1", "--warmup",
                               "0", "--clip-seconds", "1", "--scan", "true", "--remat", "full",
                               "--frontend-sub-batches", "2", "--peak-tflops", "1"])
    # Scan trip counts are multiplied in and the remat recomputation is left out.
    assert scanned[0]["model_flops_per_example"] == small
    # The first step's loss is the same with the LayerNorm kernels (same parameters
    # and batch); they change neither the model nor its FLOP count.
    fused = train_step.main(["--stage", "mae", "--batch", "8", "--steps", "1", "--warmup",
                             "0", "--clip-seconds", "1", "--fused-norm", "--peak-tflops", "1"])
    assert fused[0]["fused_norm"] and fused[0]["model_flops_per_example"] == small
    assert fused[0]["first_loss"] == pytest.approx(plain[0]["first_loss"], rel=1e-5)


# ---- aot_compile -------------------------------------------------------------------


def test_per_device_bytes_takes_one_shard():
    mesh = jax.make_mesh((8,), ("d",))
    tree = {
        "sharded": jax.ShapeDtypeStruct((16, 4), jnp.float32,
                                        sharding=NamedSharding(mesh, PartitionSpec("d"))),
        "replicated": jax.ShapeDtypeStruct((3,), jnp.bfloat16,
                                           sharding=NamedSharding(mesh, PartitionSpec())),
    }
    assert aot_compile.per_device_bytes(tree) == 2 * 4 * 4 + 3 * 2


def test_mesh_and_target_errors_name_the_fix():
    devices = jax.devices()
    with pytest.raises(aot_compile.TargetError, match="needs 6 devices"):
        aot_compile.make_mesh(devices, "2x3")
    with pytest.raises(aot_compile.TargetError, match="DATAxFSDP"):
        aot_compile.make_mesh(devices, "eight")
    with pytest.raises(aot_compile.TargetError, match="tpu:<topology>"):
        aot_compile.target_devices("gpu", 8)
    with pytest.raises(aot_compile.TargetError, match="use a gpu:<part> target"):
        aot_compile.main(["--target", "cpu", "--fused-norm", "--variant", "tiny"])


def test_gpu_target_specs_and_config():
    part, hosts, per_host = gpu_targets.parse("h100:2x8")
    assert (part.name, hosts, per_host) == ("NVIDIA H100 80GB HBM3", 2, 8)
    assert gpu_targets.parse("H200")[1:] == (1, 1)
    for bad, message in (("a100:8", "unknown GPU 'a100'"), ("h100:eight", "HOSTSxN"),
                         ("h100:0", "positive")):
        with pytest.raises(ValueError, match=message):
            gpu_targets.parse(bad)
    text = gpu_targets.target_config(part)
    assert "core_count: 132" in text and "cuda_compute_capability { major: 9 minor: 0 }" in text
    assert 'device_description_str: "NVIDIA H100 80GB HBM3"' in text
    with pytest.raises(aot_compile.TargetError, match="unknown GPU"):
        aot_compile.target_devices("gpu:b200", 8)


def test_default_memory_budget_follows_the_target(monkeypatch):
    kind = lambda name: types.SimpleNamespace(device_kind=name)
    h100 = gpu_targets.PARTS["h100"]
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    assert aot_compile.default_budget(kind(h100.name)) == h100.memory_bytes * 0.75
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    assert aot_compile.default_budget(kind(h100.name)) == h100.memory_bytes * 0.9
    assert aot_compile.default_budget(kind("TPU v5 lite")) == 16e9
    assert aot_compile.default_budget(kind("TPU v5")) == 95e9
    assert aot_compile.default_budget(kind("cpu")) == 80e9


def test_gpu_target_without_the_cuda_plugin_names_the_install():
    try:
        import jax_plugins.xla_cuda12  # noqa: F401
    except ImportError:
        with pytest.raises(aot_compile.TargetError, match=r"jax\[cuda12\]=="):
            aot_compile.target_devices("gpu:h100:8", 8)
    else:
        pytest.skip("the CUDA plugin is installed here")


def test_tpu_target_without_libtpu_falls_back_to_cpu_devices():
    devices, described, budget = aot_compile.target_devices("tpu:v5e:2x4", 1)
    assert len(devices) == 8  # one per chip, whatever --devices says
    if "stand-in" in described:
        assert budget == 16e9  # a v5e chip's HBM, not the stand-in's 80 GB
    else:
        assert "TPU topology" in described and budget is None
    assert compile_targets.tpu_stand_in("v4:2x2x2") == ("TPU v4", 8, 32e9)
    assert compile_targets.tpu_stand_in("v5litepod:4x4") == ("TPU v5e", 16, 16e9)
    assert compile_targets.tpu_stand_in("v6e:2x2")[1:] == (4, 32e9)
    assert compile_targets.tpu_stand_in("v9:weird") == ("TPU v9", 0, None)


@pytest.mark.slow
def test_aot_compile_reports_memory():
    rows = aot_compile.main(["--stage", "cacophony", "--variant", "tiny", "--per-device-batch",
                             "1", "--mesh", "1x8", "--dtype", "float32", "--clip-seconds", "1",
                             "--text-length", "16", "--device-memory-gb", "1e-6",
                             "--loss-chunk-size", "0,4"])
    # One compile per chunk size of stage 2's contrastive loss, to compare them.
    assert [(r["stage"], r["loss_chunk_size"]) for r in rows] == [("cacophony", 0),
                                                                  ("cacophony", 4)]
    # The CPU target is a stand-in, and its verdict says so.
    assert all(r["stand_in"] and r["target"] == "cpu" for r in rows)
    assert "does NOT fit in 0.0 GB (0.0 GiB) (CPU stand-in, not a GPU/TPU compiler" in (
        aot_compile.format_row(rows[0]))
    for row in rows:
        assert row["loss_kind"] == "softmax" and row["text_length"] == 16
        assert row["global_batch"] == 8 and row["mesh"] == {"data": 1, "fsdp": 8}
        assert row["memory"]["temp"] > 0
        # Donated state: the outputs alias the state arguments.
        assert row["memory"]["alias"] >= row["state_bytes_per_device"] * 0.9
        assert not row["fits"]  # a 1 kB budget
        assert row["flops_per_example"] > 0
