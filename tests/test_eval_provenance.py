"""What the eval results record of their origin: the bundle's source, step, tokenizer and
the sets as given, on a real (tiny) exported bundle run through the command line."""

import csv
import datetime
import json
import os
import shutil

import pytest

from cacophony_jax import cli
from cacophony_jax.evals import benchmark, report
from tests.helpers import write_tone

# As `export_from_checkpoint` writes it (the path as given at export).
CHECKPOINT_SOURCE = {"type": "checkpoint", "path": "runs/tiny/checkpoints", "step": 1200,
                     "task": "cacophony", "variant": "tiny"}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, official_dir):
    """The tiny release file's bundle, and copies that say they came from a checkpoint or
    say nothing of their source."""
    from cacophony_jax.convert import export
    from cacophony_jax.data.tokenizer import Tokenizer

    folder = tmp_path_factory.mktemp("bundles")
    texts = [f"a {w} sound number {k}" for w in ("dog", "rain", "bell") for k in range(20)]
    tokenizer = Tokenizer.train_bpe(texts, 300).save(folder / "tokenizer.json")
    made = {"official": export.export_from_official(
        official_dir / "Cacophony_tiny.ckpt", folder / "official", tokenizer_path=tokenizer,
        window_seconds=1.0, text_length=16)}
    for name, source in (("checkpoint", CHECKPOINT_SOURCE), ("unknown", None)):
        made[name] = folder / name
        shutil.copytree(made["official"], made[name])
        meta = json.loads((made[name] / "bundle.json").read_text())
        meta.pop("source")
        meta.update({"source": source} if source else {})
        (made[name] / "bundle.json").write_text(json.dumps(meta))
    return made


def test_results_record_the_checkpoint_step_and_the_sets_as_given(bundles, tmp_path, capsys):
    clotho = tmp_path / "clotho"
    os.makedirs(clotho)
    with open(clotho / "clotho_captions_evaluation.csv", "w", newline="") as f:
        csv.writer(f).writerows([["file_name"] + [f"caption_{k}" for k in range(1, 6)],
                                 *[[f"{k}.wav", *[f"a {w} sound" for w in ("dog", "rain",
                                                                           "bell", "car",
                                                                           "tone")]]
                                   for k in range(3)]])
    for k in range(3):
        write_tone(clotho / "evaluation" / f"{k}.wav", k)
    own = tmp_path / "own.jsonl"
    own.write_text("".join(json.dumps({"audio": str(clotho / "evaluation" / f"{k}.wav"),
                                       "captions": [f"tone {k}"]}) + "\n" for k in range(3)))
    before = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    code = cli.main(["eval", "--bundle", str(bundles["checkpoint"]), "--clotho", str(clotho),
                     "--manifest", str(own), "--synthetic", "2", "--synthetic-seconds", "1",
                     "--out", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert code == 0
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert results["bundle"] == os.path.abspath(bundles["checkpoint"])  # kept as it was
    assert results["bundle_source"] == CHECKPOINT_SOURCE
    assert results["bundle_kind"] == "cacophony"
    meta = json.loads((bundles["checkpoint"] / "bundle.json").read_text())
    assert results["tokenizer_fingerprint"] == meta["tokenizer_fingerprint"] != ""
    when = datetime.datetime.fromisoformat(results["evaluated_at"])
    assert when.utcoffset() == datetime.timedelta(0)
    assert before <= when <= datetime.datetime.now(datetime.UTC)
    sets = results["sets"]
    assert sets["clotho"]["origin"] == {"option": "--clotho", "path": str(clotho),
                                        "split": "evaluation"}
    assert sets["own.jsonl"]["origin"] == {"option": "--manifest", "path": str(own)}
    assert sets["synthetic"]["origin"] == {"option": "--synthetic", "clips": 2,
                                           "split": "eval", "seconds": 1.0, "seed": 0}
    assert sets["clotho"]["clips"] == 3 and "t2a_R@1" in sets["clotho"]["metrics"]
    text = (tmp_path / "r" / "results.md").read_text()
    assert (f"Bundle: `{os.path.abspath(bundles['checkpoint'])}` (cacophony; exported from "
            f"checkpoint `runs/tiny/checkpoints` step 1200; tokenizer "
            f"{meta['tokenizer_fingerprint']})") in text
    assert f"Evaluated at {results['evaluated_at']}." in text
    assert f"- clotho: `--clotho {clotho}` (split evaluation)" in text
    assert f"- own.jsonl: `--manifest {own}`" in text
    assert "- synthetic: `--synthetic 2` (split eval, seconds 1.0, seed 0)" in text
    assert text.strip() in out  # printed as written


def test_release_and_unrecorded_sources(bundles):
    from cacophony_jax import inference

    official = benchmark.bundle_provenance(inference.load(bundles["official"]))
    assert official["bundle_source"] == {"type": "official", "file": "Cacophony_tiny.ckpt"}
    unknown = benchmark.bundle_provenance(inference.load(bundles["unknown"]))
    assert unknown["bundle_source"] is None and unknown["bundle_kind"] == "cacophony"
    assert unknown["tokenizer_fingerprint"] == official["tokenizer_fingerprint"]
    assert benchmark.bundle_provenance(object()) == {
        "bundle_kind": None, "bundle_source": None, "tokenizer_fingerprint": None}
    for provenance, says in ((official, "converted from the release file "
                                        "`Cacophony_tiny.ckpt`"),
                             (unknown, "source not recorded")):
        text = report.results_markdown({"bundle": "B", **provenance, "sets": {}})
        assert f"Bundle: `B` (cacophony; {says}; tokenizer " in text
        assert "Evaluated at" not in text and "Sets:" not in text
