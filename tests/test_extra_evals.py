"""Evaluation sets next to config.data.eval (config.data.extra_evals): parsing, the
checks before training, the metrics of each set and their log lines."""

import logging

import numpy as np
import pytest

from cacophony_jax import tasks
from cacophony_jax.train import stages
from tests.helpers import tiny_config


@pytest.mark.slow  # trains and evaluates extra sets (about 20 s on 2 cores)
def test_extra_evaluation_sets_are_evaluated_alongside(tmp_path, caplog, monkeypatch):
    import soundfile

    from cacophony_jax.tasks.cacophony import CacophonyTask

    made = []  # jitted evaluation functions made (each compiles on its own)
    for name in ("_embed_audio_fn", "_embed_text_fn"):
        real = getattr(CacophonyTask, name)
        monkeypatch.setattr(CacophonyTask, name,
                            lambda self, real=real, name=name: made.append(name) or real(self))

    root = tmp_path / "esc50"
    (root / "meta").mkdir(parents=True)
    (root / "audio").mkdir()
    rows = [("1-1-A-0.wav", 1, 0, "dog"), ("1-2-A-1.wav", 1, 1, "rain"),
            ("2-3-A-0.wav", 2, 0, "dog")]
    (root / "meta" / "esc50.csv").write_text("filename,fold,target,category\n" + "".join(
        f"{name},{fold},{target},{label}\n" for name, fold, target, label in rows))
    rng = np.random.default_rng(0)
    for name, *_ in rows:
        soundfile.write(root / "audio" / name, rng.uniform(-0.3, 0.3, 16000), 16000)
    config = tiny_config("cacophony", 2, **{
        "data.extra_evals": f"synthetic:, esc50:{root}:fold1", "train.checkpoint_every": 2})
    with caplog.at_level(logging.WARNING):
        final = stages.run(config, str(tmp_path / "w"))["cacophony"]
    # Three sets, one set of evaluation functions: their compilations are shared.
    assert sorted(made) == ["_embed_audio_fn", "_embed_text_fn"]
    # An evaluation's warnings say which set they are about.
    assert "eval_synthetic: retrieval over 8 clips" in caplog.text
    assert "\nretrieval over 8 clips" in "\n" + "\n".join(r.getMessage() for r in caplog.records)
    # The same synthetic set twice: the same numbers under both names.
    plain = {k.removeprefix("eval/"): v for k, v in final.items() if k.startswith("eval/")}
    assert plain and plain == {k.removeprefix("eval_synthetic/"): v for k, v in final.items()
                               if k.startswith("eval_synthetic/")}
    assert final["eval_esc50/num_clips"] == 2.0  # fold 1
    assert final["eval_esc50/num_classes"] == 2.0 and "eval_esc50/zeroshot_top1" in final
    assert "| cacophony | eval_esc50/zeroshot_top1 |" in stages.summary({"cacophony": final})
    assert "| cacophony | eval_esc50/zeroshot_top1 | {:.4g} | 50 |".format(
        final["eval_esc50/zeroshot_top1"]) in stages.summary({"cacophony": final})
    from cacophony_jax.train import metrics

    assert metrics.format_eval({"eval/t2a_R@1": 5.0, "eval_esc50/zeroshot_top1": 50.0,
                                "eval/num_clips": 8.0}) == (
        "num_clips 8, t2a_R@1 5; eval_esc50: zeroshot_top1 50")
    blocks = tasks.common.extra_eval_blocks(tiny_config("cacophony", 2, **{
        "data.extra_evals": "clotho:gs://b/c, clotho:/d/c:evaluation ,esc50:/e:fold2,"}))
    assert [(name, dict(sub.data.eval)) for name, sub in blocks] == [
        ("eval_clotho", dict(kind="clotho", path="gs://b/c", split="eval")),
        ("eval_clotho_2", dict(kind="clotho", path="/d/c", split="evaluation")),
        ("eval_esc50", dict(kind="esc50", path="/e", split="fold2"))]
    empty = tmp_path / "clotho"  # a split whose list has only its header
    (empty / "evaluation").mkdir(parents=True)
    (empty / "clotho_captions_evaluation.csv").write_text(
        "file_name,caption_1,caption_2,caption_3,caption_4,caption_5\n")
    # Mistakes stop the run before it starts, naming the field.
    for value, message in ((f"esc5:{root}", r"extra_evals entry 'esc5:.*did you mean 'esc50'"),
                           ("clotho", "'clotho': clotho needs a path"),
                           (f"clotho:{tmp_path / 'nope'}", "clotho's path .*nope' does not"),
                           ("clotho:gs://bucket/clotho", r"\(eval_clotho\)='gs://bucket/clotho' "
                                                         "is not a file-system path"),
                           ("synthetic:/tmp", "the synthetic set reads no files"),
                           (f"clotho:{empty}", f"entry 'clotho:{empty}' names a set with no "
                                               "clips"),
                           (f"clotho:{root}", f"entry 'clotho:{root}' \\(kind='clotho'")):
        bad = tiny_config("cacophony", 2, **{"data.extra_evals": value})
        with pytest.raises(ValueError, match=message):
            stages.run(bad, str(tmp_path / "bad"))
        assert not (tmp_path / "bad").exists()
