"""What a run checks of its workdir before it starts, and how an interrupted run ends."""

import pytest

from cacophony_jax.train import host


@pytest.mark.parametrize("name, make", [("checkpoints", "file"), ("metrics.jsonl", "folder"),
                                        ("config.json", "folder")])
def test_a_workdir_entry_of_the_wrong_kind_is_refused_before_training(tmp_path, name, make):
    # Found at the first save or log row, the steps before it would be lost.
    entry = tmp_path / name
    entry.mkdir() if make == "folder" else entry.write_text("")
    with pytest.raises(ValueError, match=f"{name} is a {make}, where the run keeps its {name}"):
        host.make_workdir(str(tmp_path))
    assert entry.exists()  # left as it was
    entry.rmdir() if make == "folder" else entry.unlink()
    assert host.make_workdir(str(tmp_path)) == tmp_path


@pytest.mark.parametrize("second", [False, True])
def test_a_ctrl_c_names_whether_a_checkpoint_was_skipped(second, monkeypatch, capsys):
    """A second Ctrl-C skips the checkpoint the first asked for; one before training took
    the signals over (opening data, training a tokenizer) had nothing to save."""
    from cacophony_jax import main
    from cacophony_jax.train import host, stages

    def interrupted(config, workdir):
        raise host.SecondInterruptError if second else KeyboardInterrupt

    monkeypatch.setattr(stages, "run", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        main._train()
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    assert ("one Ctrl-C saves a checkpoint first" in err) == second
    assert second or "outside training, where a Ctrl-C has nothing to save" in err


def test_a_third_ctrl_c_ends_the_process_when_the_second_went_unheard(monkeypatch):
    import signal

    sent = []
    monkeypatch.setattr(host.os, "kill", lambda pid, sig: sent.append(sig))
    stop = host.StopSignal()
    try:
        stop._handle(signal.SIGINT, None)  # the first asks for a checkpoint and a stop
        assert stop.requested and not sent
        with pytest.raises(host.SecondInterruptError):
            stop._handle(signal.SIGINT, None)
        assert not sent  # swallowed, say, inside a compile: the run goes on
        stop._handle(signal.SIGINT, None)
        assert sent == [signal.SIGINT]
        assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL
    finally:
        stop.restore()


def test_a_second_ctrl_c_inside_jaxs_gc_callback_ends_the_process(monkeypatch):
    import signal
    import sys

    sent = []
    monkeypatch.setattr(host.os, "kill", lambda pid, sig: sent.append(sig))
    stop = host.StopSignal()

    def _xla_gc_callback():  # where Python would ignore the exception a handler raises
        stop._handle(signal.SIGINT, sys._getframe())

    try:
        stop._handle(signal.SIGINT, None)
        _xla_gc_callback()
        assert sent == [signal.SIGINT]
    finally:
        stop.restore()


@pytest.mark.parametrize("index, written", [(1, False), (1, True), (0, True)])
def test_a_workdir_that_is_each_hosts_own_disk_is_refused(tmp_path, monkeypatch, index,
                                                          written):
    """A stand-in for one process of two: process 0 writes the token file; process 1 reads
    it back, or (its own disk) does not find it."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    token = np.arange(4, dtype=np.uint32)
    name = f".shared-check-{token.tobytes().hex()}"
    if index == 1 and written:
        (tmp_path / name).write_text(token.tobytes().hex())
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: index)
    # Process 0 sends its own token; process 1 receives the one it is given here.
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all",
                        lambda x: x if index == 0 else token)
    gathered = []

    def allgather(flag):
        gathered.append(int(flag))
        return np.array([1, int(flag)] if index == 1 else [int(flag), 1])

    monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
    if written:
        host.check_shared(tmp_path, wait_s=0.1)
    else:
        with pytest.raises(ValueError, match=r"not one folder shared by the processes of this "
                                             r"run: process\(es\) \[1\] do not see"):
            host.check_shared(tmp_path, wait_s=0.1)
    assert gathered == [int(written)]
    if written:  # a recipe's stage folder inside a checked workdir is not checked again
        host.check_shared(tmp_path / "mae", wait_s=0.1)
        assert gathered == [1]
    assert [p.name for p in tmp_path.iterdir()] == ([name] if index == 1 and written else [])
