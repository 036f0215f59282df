"""The jaxpr FLOP counter behind the benchmarks' MFU."""

import jax
import jax.numpy as jnp
import pytest

from benchmarks import train_step
from cacophony_jax.train import flops, metrics


def test_matmul_and_its_gradient():
    x, w = jnp.ones((4, 8)), jnp.ones((8, 16))
    forward = 2 * 4 * 8 * 16
    assert flops.count(jnp.matmul, x, w).flops == forward
    # The backward pass adds one product per input that needs a gradient.
    loss = lambda x, w: (x @ w).sum()
    assert flops.count(jax.grad(loss, argnums=1), x, w).flops == 2 * forward
    assert flops.count(jax.grad(loss, argnums=(0, 1)), x, w).flops == 3 * forward


def test_batched_dot_counts_batch_dimensions():
    q, k = jnp.ones((2, 3, 5, 7)), jnp.ones((2, 3, 11, 7))
    counted = flops.count(lambda q, k: jnp.einsum("bhqd,bhkd->bhqk", q, k), q, k)
    assert counted.flops == 2 * 2 * 3 * 5 * 11 * 7


def test_loops_multiply_their_bodies_and_cond_takes_the_worst_branch():
    w = jnp.ones((8, 8))

    def scanned(x):
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=5)[0]

    one = 2 * 4 * 8 * 8
    assert flops.count(jax.jit(scanned), jnp.ones((4, 8))).flops == 5 * one
    mapped = flops.count(lambda xs: jax.lax.map(lambda x: x @ w, xs), jnp.ones((6, 4, 8)))
    assert mapped.flops == 6 * one

    def branchy(p, x):
        return jax.lax.cond(p, lambda x: x @ w @ w, lambda x: x + 1.0, x)

    assert flops.count(branchy, True, jnp.ones((4, 8))).flops == 2 * one


def test_while_loops_are_reported():
    w = jnp.ones((8, 8))

    def loop(x):
        return jax.lax.while_loop(lambda c: c[1] < 3, lambda c: (c[0] @ w, c[1] + 1), (x, 0))[0]

    counted = flops.count(loop, jnp.ones((4, 8)))
    assert counted.while_loops == 1 and counted.flops == 2 * 4 * 8 * 8


def test_convolution():
    x, k = jnp.ones((2, 3, 10, 10)), jnp.ones((6, 3, 3, 3))  # NCHW, OIHW
    conv = lambda x, k: jax.lax.conv(x, k, (1, 1), "VALID")
    out_elements = 2 * 6 * 8 * 8
    assert flops.count(conv, x, k).flops == 2 * out_elements * 3 * 3 * 3


def test_base_mae_step_matches_the_hand_count():
    """The traced count of the real base step against an independent formula."""
    config = train_step.make_config("mae", "base", 8)
    built = train_step.build_step(config)
    visible, patches = built.task.num_visible, built.task.num_patches
    d, mlp, layers, patch_dim = 768, 3072, 12, 256

    def block(n):  # q/k/v/out projections, MLP, then QK^T and AV
        return 2 * n * (4 * d * d + 2 * d * mlp) + 2 * 2 * n * n * d

    encoder = 2 * visible * patch_dim * d + layers * block(visible)
    decoder = 2 * visible * d * d + layers * block(patches) + 2 * patches * d * patch_dim
    expected = 3 * (encoder + decoder)  # forward + two backward products
    # What the formula leaves out is the front end's DFT/mel products (forward only).
    counted = train_step.model_flops_per_example(config)
    assert counted == pytest.approx(expected, rel=2e-3)
    assert counted > expected


def test_remat_and_fused_attention_do_not_change_the_model_flops():
    plain = train_step.make_config("cacophony", "tiny", 8, clip_seconds=1.0)
    remat = train_step.make_config("cacophony", "tiny", 8, clip_seconds=1.0, remat="full")
    remat.unlock()
    remat.model.attention = "cudnn"  # traced as XLA attention; never compiled here
    assert (train_step.model_flops_per_example(remat)
            == train_step.model_flops_per_example(plain))


def test_sam_doubles_the_model_flops():
    """SAM takes a second gradient; the front end runs once, so slightly under 2x."""
    plain = train_step.make_config("cacophony", "base", 8)
    sam = train_step.make_config("cacophony", "base", 8, sam=True)
    assert sam.optim.sam.enabled and not plain.optim.sam.enabled
    ratio = (train_step.model_flops_per_example(sam)
             / train_step.model_flops_per_example(plain))
    assert 1.999 < ratio < 2.0


def test_datasheet_peaks_by_device_name():
    # JAX's device_kind strings; the NVL cards have fewer TFLOP/s than the SXM ones.
    for kind, tflops in (("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
                         ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989),
                         ("NVIDIA H200 NVL", 835), ("TPU v5 lite", 197), ("TPU v5p", 459)):
        assert flops.datasheet_peak(kind)[0] == tflops * 1e12, kind
    assert flops.datasheet_peak("cpu") is None


def test_progress_reports_model_tflops_and_mfu(monkeypatch):
    # Each Progress: its start, its first step (compiling), then a window.
    clock = iter([0.0, 30.0, 32.0, 0.0, 9.0, 10.5, 0.0, 4.0, 5.0])
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    progress = metrics.Progress(100, 0, 32, step_flops_per_device=5e12,
                                peak_flops_per_device=50e12)
    progress.add_wait(1.0)  # while compiling: not part of the next window
    first = progress.rates(1)
    assert first == {"perf/first_step_seconds": 30.0}
    line = progress.line(1, {"loss": 1.0}, first)
    assert "first step 30.0 s" in line and "ETA" not in line and "ex/s" not in line
    progress.add_wait(0.05)
    rates = progress.rates(11)  # 10 steps in 2 s: 25 TFLOP/s of a 50 TFLOP/s peak
    assert rates["perf/model_tflops_per_device"] == pytest.approx(25.0)
    assert rates["perf/mfu"] == pytest.approx(0.5)
    assert rates["perf/input_wait_fraction"] == pytest.approx(0.025)
    assert "MFU 50.0%" in progress.line(10, {"loss": 1.0}, rates)
    unknown_peak = metrics.Progress(100, 0, 32, step_flops_per_device=5e12)
    unknown_peak.rates(1)
    unknown_peak.add_pause(0.5)  # an evaluation: not training time
    rates = unknown_peak.rates(5)  # 4 steps in 1.5 - 0.5 s
    assert "perf/mfu" not in rates and rates["perf/steps_per_sec"] == pytest.approx(4.0)
    assert "20 TFLOP/s/device" in unknown_peak.line(4, {"loss": 1.0}, rates)
    no_flops = metrics.Progress(100, 0, 32)
    no_flops.rates(1)
    assert "perf/model_tflops_per_device" not in no_flops.rates(2)


def _tensorboard_events(path):
    """The events of one TensorBoard file (records: u64 length, u32 crc, data, u32 crc)."""
    import struct

    from tensorboardX.proto import event_pb2

    data, events, at = path.read_bytes(), [], 0
    while at < len(data):
        (length,) = struct.unpack("<Q", data[at:at + 8])
        event = event_pb2.Event()
        event.ParseFromString(data[at + 12:at + 12 + length])
        events.append(event)
        at += 16 + length
    return events


def test_metric_writer_resume_drops_later_and_cut_rows(tmp_path):
    import json

    earlier = metrics.MetricWriter(str(tmp_path), enabled=True)
    for s in (1, 2, 3, 4):
        earlier.write(s, {"loss": 1.0 / s})
    earlier.close()
    path = tmp_path / "metrics.jsonl"
    path.write_text(path.read_text()[:-5])  # the step-4 row cut short by a kill
    (first,) = (tmp_path / "tensorboard").iterdir()
    first.rename(first.with_name("events.out.tfevents.0000000001.earlier"))
    writer = metrics.MetricWriter(str(tmp_path), enabled=True)
    writer.resume_at(2)  # steps 3 and 4 run again
    writer.write(3, {"loss": 0.25})
    writer.close()
    lines = path.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    assert json.loads(lines[-1])["loss"] == 0.25
    # TensorBoard: one new events file, which first hides the old events from step 3 on.
    files = sorted((tmp_path / "tensorboard").iterdir())
    assert len(files) == 2
    new = _tensorboard_events(files[1])
    starts = [i for i, e in enumerate(new) if e.session_log.status == e.session_log.START]
    assert [new[i].step for i in starts] == [3] and starts[0] < len(new) - 1
    assert [(e.step, v.tag, v.simple_value) for e in new for v in e.summary.value] == [
        (3, "loss", 0.25)]
