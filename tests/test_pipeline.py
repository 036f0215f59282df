"""Grain pipelines: determinism, exact resume, host sharding, evaluation batches (reading
records and skipping bad ones is in test_pipeline_records.py)."""

import logging

import jax
import numpy as np
import pytest

from cacophony_jax.data import pipeline

CLIP = 2800  # samples: training skips clips under one patch (2,401)


class IndexSource:
    """Clip i is a constant waveform of value i (so batches reveal which record)."""

    name = "index"
    class_names = ("a", "b")

    def __init__(self, n, length=3000):
        self.n, self.length = n, length

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"id": str(i), "audio": np.full(self.length, i + 1, np.int16),
                "captions": [f"caption {i}"], "synthetic_captions": [f"synthetic {i}"],
                "labels": [i % 2]}


class FakeTokenizer:
    vocab_size = 100

    def encode(self, texts, length, eos_when_cut=True):
        ids = np.ones((len(texts), length), np.int32)
        mask = np.zeros((len(texts), length), np.int32)
        for r, t in enumerate(texts):
            n = min(len(t), length)
            ids[r, :n] = [ord(c) % 100 for c in t[:n]]
            mask[r, :n] = 1
        return ids, mask


def record_ids(batch):
    """Record index of each row (audio is constant i + 1 over its valid part)."""
    return batch["audio"][:, 0].astype(int) - 1


def take(it, n):
    return [next(it) for _ in range(n)]


def make(source, seed=0, fmt=None, batch=4):
    fmt = fmt or pipeline.ExampleFormat(clip_samples=CLIP)
    return iter(pipeline.train_dataset(source, fmt, global_batch_size=batch, seed=seed,
                                       read_threads=2))


def test_train_batches_follow_the_contract():
    fmt = pipeline.ExampleFormat(clip_samples=CLIP, text_length=12, synthetic_prob=0.0,
                                 tokenizer=FakeTokenizer())
    batch = next(make(IndexSource(10, length=2500), fmt=fmt))
    assert batch["audio"].shape == (4, CLIP) and batch["audio"].dtype == np.int16
    assert batch["audio_len"].tolist() == [2500] * 4
    assert np.all(batch["audio"][:, 2500:] == 0)  # zero-padded past the clip
    assert batch["text_ids"].shape == (4, 12) and batch["text_mask"].dtype == np.int32
    assert batch["valid"].tolist() == [1.0] * 4


def test_long_clips_are_cropped_at_random_offsets():
    class Ramp(IndexSource):
        def __getitem__(self, i):
            return {"id": str(i), "audio": np.arange(9000, dtype=np.int16), "captions": []}

    starts = {int(row[0]) for b in take(make(Ramp(8)), 6) for row in b["audio"]}
    assert len(starts) > 3  # random crops, not always the start
    assert all(0 <= s <= 9000 - CLIP for s in starts)


def test_same_seed_same_batches_other_seed_other_order():
    a = [record_ids(b) for b in take(make(IndexSource(20)), 6)]
    b = [record_ids(b) for b in take(make(IndexSource(20)), 6)]
    c = [record_ids(b) for b in take(make(IndexSource(20), seed=1), 6)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_an_epoch_visits_every_record_once():
    seen = np.concatenate([record_ids(b) for b in take(make(IndexSource(20)), 5)])
    assert sorted(seen.tolist()) == list(range(20))


def test_resume_from_state_gives_exactly_the_following_batches():
    fmt = pipeline.ExampleFormat(clip_samples=CLIP, text_length=8, synthetic_prob=0.5,
                                 tokenizer=FakeTokenizer())
    it = make(IndexSource(13, length=6000), fmt=fmt)
    take(it, 3)
    state = it.get_state()
    expected = take(it, 4)
    resumed = make(IndexSource(13, length=6000), fmt=fmt)
    resumed.set_state(state)
    for want, got in zip(expected, take(resumed, 4), strict=True):
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])


@pytest.mark.parametrize("count", [1, 2])
def test_starting_at_a_batch_continues_the_same_stream(monkeypatch, count):
    # What a resume does when a saved position cannot be restored (another number of
    # workers or processes): the batches, crops included, of an iterator that ran on.
    def host_batches(index, first, n):
        monkeypatch.setattr(jax, "process_index", lambda: index)
        monkeypatch.setattr(jax, "process_count", lambda: count)
        it = iter(pipeline.train_dataset(IndexSource(7, length=6000),
                                         pipeline.ExampleFormat(clip_samples=CLIP),
                                         global_batch_size=2 * count, seed=3,
                                         read_threads=2, first_batch=first))
        return take(it, n)

    for index in range(count):
        straight = host_batches(index, 0, 9)
        for want, got in zip(straight[5:], host_batches(index, 5, 4), strict=True):
            for key in want:
                np.testing.assert_array_equal(want[key], got[key])
    with pytest.raises(ValueError, match="first_batch must be at least 0"):
        host_batches(0, -1, 1)


@pytest.mark.parametrize("count", [2, 3])
def test_process_shards_are_disjoint_and_complete(monkeypatch, count):
    per_process = []
    for index in range(count):
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        monkeypatch.setattr(jax, "process_count", lambda: count)
        it = make(IndexSource(24), batch=2 * count)  # 2 rows per host per step
        per_process.append(np.concatenate([record_ids(b) for b in take(it, 24 // count // 2)]))
    everything = np.concatenate(per_process)
    assert sorted(everything.tolist()) == list(range(24))


def test_hosts_hold_their_rows_of_the_one_host_batches(monkeypatch):
    # Host i holds rows [2i, 2i + 2) of every one-host batch of 4, crops included: the
    # global batches are the one-host batches, rows in the same order (so masks and
    # dropout drawn per row match too), not fixed groups of consecutive records with
    # one shared crop (what per-host shards with one seed gave).
    class Ramps(IndexSource):
        def __getitem__(self, i):
            record = super().__getitem__(i)
            record["audio"] = (np.arange(9000) % 1000 + 1000 * i).astype(np.int16)
            return record

    single = np.concatenate([b["audio"][:, 0] for b in take(make(Ramps(20), batch=4), 10)])
    count = 2
    rows = []
    for index in range(count):
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        monkeypatch.setattr(jax, "process_count", lambda: count)
        it = make(Ramps(20), batch=4)  # 2 rows per host per step
        rows.append(np.concatenate([b["audio"][:, 0] for b in take(it, 10)]))
    global_rows = np.stack([r.reshape(10, 2) for r in rows], axis=1).reshape(-1)
    np.testing.assert_array_equal(global_rows, single)


def test_choose_caption_respects_synthetic_prob():
    rng = np.random.default_rng(0)
    record = {"captions": ["real"], "synthetic_captions": ["synthetic"]}
    picks = [pipeline.choose_caption(record, 0.3, rng) for _ in range(2000)]
    share = picks.count("synthetic") / len(picks)
    assert 0.25 < share < 0.35
    assert pipeline.choose_caption({"captions": [], "synthetic_captions": ["s"]}, 0.0,
                                   rng) == "s"
    assert pipeline.choose_caption({"captions": ["r"]}, 1.0, rng) == "r"


def test_eval_batches_cover_every_record_once_with_padding():
    source = IndexSource(11, length=2500)  # padded to CLIP
    batches = list(pipeline.eval_batches(source, CLIP, global_batch_size=4))
    assert len(batches) == 3
    ids = np.concatenate([b["example_id"] for b in batches])
    valid = np.concatenate([b["valid"] for b in batches])
    assert sorted(ids[valid > 0].tolist()) == list(range(11))
    assert valid.tolist() == [1.0] * 11 + [0.0]
    first = batches[0]
    assert np.array_equal(record_ids(first), first["example_id"])
    assert first["label"].tolist() == [0, 1, 0, 1]


def test_an_unusable_eval_record_is_named_once_not_at_every_evaluation(caplog):
    from cacophony_jax.audio.io import AudioError

    class Broken(IndexSource):
        name = "broken-eval"

        def __getitem__(self, i):
            if i == 2:
                raise AudioError("clip 2 is damaged")
            return super().__getitem__(i)

    with caplog.at_level(logging.WARNING):
        for _ in range(3):  # three evaluations
            batches = list(pipeline.eval_batches(Broken(5, length=2500), CLIP,
                                                 global_batch_size=4))
            valid = np.concatenate([b["valid"] for b in batches])
            assert valid.sum() == 4  # still left out each time
    assert caplog.text.count("clip 2 is damaged") == 1


def test_an_eval_clip_shorter_than_one_patch_is_left_out(caplog):
    # It has no whole patch, so its embedding would not depend on its audio: like a
    # training draw, it is unusable (and named), not a valid row.
    class Short(IndexSource):
        name = "short-eval"

        def __getitem__(self, i):
            record = super().__getitem__(i)
            if i == 1:
                record["audio"] = record["audio"][:2400]
            return record

    with caplog.at_level(logging.WARNING):
        batches = list(pipeline.eval_batches(Short(3), CLIP, global_batch_size=4))
    assert batches[0]["valid"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert "less than one 16-frame patch" in caplog.text


def test_eval_hosts_cover_every_record_with_equal_batch_counts(monkeypatch):
    counts, ids = [], []
    for index in range(3):
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        monkeypatch.setattr(jax, "process_count", lambda: 3)
        batches = list(pipeline.eval_batches(IndexSource(10), CLIP, global_batch_size=6))
        counts.append(len(batches))
        for b in batches:
            ids += b["example_id"][b["valid"] > 0].tolist()
    assert len(set(counts)) == 1
    assert sorted(ids) == list(range(10))


def test_eval_texts_and_text_batches():
    texts = pipeline.eval_texts(IndexSource(3))
    assert texts.captions == ["caption 0", "caption 1", "caption 2"]
    assert texts.caption_clip.tolist() == [0, 1, 2]
    assert texts.labels == [(0,), (1,), (0,)]
    batches = list(pipeline.text_batches(texts.captions, FakeTokenizer(), 6, 2))
    assert [b["valid"].tolist() for b in batches] == [[1.0, 1.0], [1.0, 0.0]]


def test_global_batch_must_divide_over_processes(monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        pipeline.host_batch_size(8)


def test_worker_processes_give_the_same_batches_and_ignore_ctrl_c():
    fmt = pipeline.ExampleFormat(clip_samples=CLIP)
    threads = take(make(IndexSource(12)), 2)
    it = iter(pipeline.train_dataset(IndexSource(12), fmt, global_batch_size=4, seed=0,
                                     read_threads=2, num_workers=1))
    try:
        for a, b in zip(threads, take(it, 2), strict=True):
            np.testing.assert_array_equal(a["audio"], b["audio"])
    finally:
        it.close()
    # What the workers run first (here in this process, restored afterwards).
    import signal

    old = signal.getsignal(signal.SIGINT)
    try:
        pipeline._leave_interrupts_to_the_trainer(0, 1)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)


def test_a_source_without_captions_is_refused_for_text_training(caplog):
    fmt = pipeline.ExampleFormat(clip_samples=CLIP, text_length=12, tokenizer=FakeTokenizer())

    class Labels(IndexSource):  # labelled clips, as a classification set gives them
        def __getitem__(self, i):
            return {**super().__getitem__(i), "captions": [], "synthetic_captions": []}

    with pytest.raises(ValueError, match="training source 'index' has no captions"):
        pipeline.train_dataset(Labels(10), fmt, global_batch_size=4, seed=0)

    class Half(IndexSource):
        def __getitem__(self, i):
            record = super().__getitem__(i)
            return record if i % 2 else {**record, "captions": [], "synthetic_captions": []}

    batch = next(iter(pipeline.train_dataset(Half(10), fmt, global_batch_size=4, seed=0)))
    assert "about 50% of the records of index have no caption" in caplog.text
    assert np.all(record_ids(batch) % 2 == 1)  # only captioned records are drawn
    # Audio-only training (stage 1) does not care.
    pipeline.train_dataset(Labels(10), pipeline.ExampleFormat(clip_samples=CLIP),
                           global_batch_size=4, seed=0)
