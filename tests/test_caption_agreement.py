"""In-training captioning evaluation and a bundle's `eval` turn the same generated ids
into the same captions, and so into the same caption metrics."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cacophony_jax import inference, tasks
from cacophony_jax.data.spec import BOS_ID, EOS_ID, PAD_ID
from cacophony_jax.data.synthetic import SyntheticCorpus
from cacophony_jax.evals import benchmark
from cacophony_jax.models import decoding
from cacophony_jax.parallel import mesh as mesh_lib
from cacophony_jax.tasks import cacophony as cacophony_task
from tests.helpers import tiny_config
from tests.test_inference import export_bundles

MAX_LEN = 32  # more than the bundle's text length: this tokenizer splits class names


def _rows(tok, class_names):
    """Per clip, ids a byte-level tokenizer decodes with a control character and a
    U+FFFD (the first byte of a cut "é"), or a row cut at MAX_LEN inside its last word."""
    def ids(text):
        return tok.backend.encode(text, add_special_tokens=False).ids

    half = ids("é")[:1]
    assert tok.decode([half]) == ["\ufffd"]
    rows = []
    for i, name in enumerate(class_names):
        if i % 2 == 0:
            row = [BOS_ID, *ids(f"a {name}\x07 rings"), *half, EOS_ID]
        else:  # no eos: the caption was cut, and its last word may be a piece
            tail = [*ids(f" {name}\x0e"), *half]
            row = [BOS_ID, *ids(" a") * (MAX_LEN - 1 - len(tail)), *tail]
        assert len(row) <= MAX_LEN
        rows.append(row + [PAD_ID] * (MAX_LEN - len(row)))
    return np.asarray(rows, np.int32)


def test_training_evaluation_and_bundle_eval_give_the_same_captions(
        official_dir, tmp_path, monkeypatch):
    model = inference.load(export_bundles(official_dir, tmp_path)[0])
    tok = model.tokenizer
    config = tiny_config("cacophony", 1, **{"tokenizer.vocab_size": tok.vocab_size,
                                            "eval.caption_clips": 8,
                                            "eval.caption_max_len": MAX_LEN})
    source = SyntheticCorpus("eval", config.data.synthetic_eval_size,
                             config.audio.eval_clip_seconds, seed=config.data.synthetic_seed)
    names = [source.class_names[source.metadata(i)["labels"][0]] for i in range(len(source))]
    rows = _rows(tok, names)
    raw = tok.decode(rows)
    assert any("\x07" in t or "\ufffd" in t for t in raw)

    # Both paths generate the same ids for the same clip (one batch, clips in order).
    def generate(module, params, states, mask, **options):
        assert options["max_len"] == MAX_LEN
        return jnp.asarray(rows[: states.shape[0]])

    monkeypatch.setattr(decoding, "generate", generate)

    scored, training_metrics = {}, {}
    real_scores = cacophony_task.caption_scores

    def recording_scores(predictions, texts):
        scored.update(predictions)
        training_metrics.update(real_scores(predictions, texts))
        return training_metrics

    monkeypatch.setattr(cacophony_task, "caption_scores", recording_scores)
    task = tasks.build(config, tok)
    params = nn.unbox(task.init_params(jax.random.key(0)))
    task.evaluator(mesh_lib.make_mesh(config.mesh), tok)(params)
    training = [scored[i] for i in range(len(source))]

    shown = []
    real_caption = model.caption

    def recording_caption(clips, **options):
        shown.extend(real_caption(clips, **options))
        return shown[-len(clips):]

    monkeypatch.setattr(model, "caption", recording_caption)
    report = benchmark.class_mention_report(model, source, batch_size=len(source),
                                            max_len=MAX_LEN)

    assert shown == training == tok.captions(rows)
    assert training != raw
    assert not any(c in t for t in training for c in "\x07\x0e\ufffd")
    assert report["clips"] == len(source)
    assert 100.0 * report["class_mention_rate"] == pytest.approx(
        training_metrics["eval/caption_names_class"])
