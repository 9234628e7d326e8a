"""``python -m course_utils.train`` cannot lose progress: keyed training states, --resume / --restart,
refusals with the command to run, corrupt states, argument checks, unwritable --out, Ctrl-C.

The CLI's ``main(argv)`` runs in-process on a tiny preset (64 images of 32 px, ResNet-10 width 8,
2 epochs); the evaluation is stubbed so each run takes about a second.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from course_utils import train
from course_utils.data.shapes import ShapesWorld

TINY = train.Preset("tiny-test", "tiny test preset", "shapes", {"n": 64, "size": 32, "seed": 0}, depth=10, width=8,
                    epochs=2, batch_size=32)


@pytest.fixture(scope="module")
def tiny_world() -> ShapesWorld:
    return ShapesWorld(n=64, size=32, seed=0)


@pytest.fixture
def cli(tmp_path, monkeypatch, tiny_world):
    """A runner for ``train.main`` on the tiny preset, with data root and --out in tmp_path."""
    monkeypatch.setenv("COURSE_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.setitem(train.PRESETS, TINY.name, TINY)
    calls = {"data": 0}

    def data(preset, split):
        calls["data"] += 1
        return tiny_world

    monkeypatch.setattr(train, "_data", data)
    monkeypatch.setattr(train, "evaluate", lambda model, preset, device: {"simclr_probe": 0.5})

    class Runner:
        out = tmp_path / "out"
        argv = ["--preset", TINY.name, "--out", str(tmp_path / "out")]
        command = f"python -m course_utils.train --preset {TINY.name} --out {tmp_path / 'out'}"
        data_calls = calls

        def __call__(self, *extra: str) -> dict:
            return train.main([*self.argv, *extra])

        def interrupt_after(self, epoch: int) -> None:
            """Make the next run raise KeyboardInterrupt (Ctrl-C) after ``epoch`` is saved."""
            real = train.train_simclr

            def interrupted(*args, callback=None, **kwargs):
                def stop(done, history):
                    callback(done, history)
                    if done == epoch:
                        raise KeyboardInterrupt

                try:
                    return real(*args, callback=stop, **kwargs)
                finally:
                    monkeypatch.setattr(train, "train_simclr", real)

            monkeypatch.setattr(train, "train_simclr", interrupted)

        @staticmethod
        def states() -> list[Path]:
            return sorted((tmp_path / "data" / "train").glob("*.state.pt"))

    # one thread: tiny convolutions gain nothing from two, and on a loaded 2-CPU machine OpenMP threads
    # waiting for a descheduled sibling made a single backward pass take minutes
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Runner()
    torch.set_num_threads(threads)


def _exit(run, *extra: str) -> pytest.ExceptionInfo:
    try:
        with pytest.raises(SystemExit) as info:
            run(*extra)
    except KeyboardInterrupt:  # would otherwise end the whole pytest session
        pytest.fail("Ctrl-C escaped main() instead of ending the run with a message")
    return info


def _epochs_trained(output: str) -> list[int]:
    return [int(line.split()[1].split("/")[0]) for line in output.splitlines() if line.startswith("epoch ")]


def _interrupted_run(cli, capsys) -> Path:
    cli.interrupt_after(1)
    assert _exit(cli).value.code == 130
    capsys.readouterr()
    (state,) = cli.states()
    return state


def test_ctrl_c_prints_how_to_resume_and_exits_130(cli, capsys):
    cli.interrupt_after(1)
    info = _exit(cli)
    err = capsys.readouterr().err
    assert info.value.code == 130
    assert "interrupted after epoch 1 of 2" in err
    assert f"{cli.command} --resume" in err
    assert len(cli.states()) == 1 and str(cli.states()[0]) in err


def test_a_run_with_an_unfinished_state_refuses_to_start_over_and_resumes_with_resume(cli, capsys):
    state = _interrupted_run(cli, capsys)
    before = state.read_bytes()
    message = str(_exit(cli).value.code)
    assert str(state) in message and "epoch 1 of 2" in message
    assert f"{cli.command} --resume" in message and f"{cli.command} --restart" in message
    assert state.read_bytes() == before, "the refused run must not touch the state"

    result = cli("--resume")
    assert _epochs_trained(capsys.readouterr().out) == [2], "--resume continues after the saved epoch"
    assert result["epochs"] == 2 and (cli.out / f"{TINY.name}.pt").is_file()
    assert "--resume" not in result["command"], "the recorded command reproduces the run"
    assert cli.states() == [], "the state is removed once the checkpoint is written"
    cli()  # a finished run can be run again
    assert _epochs_trained(capsys.readouterr().out) == [1, 2]


def test_restart_discards_the_state_and_trains_from_the_first_epoch(cli, capsys):
    state = _interrupted_run(cli, capsys)
    cli("--restart")
    out = capsys.readouterr().out
    assert f"removed {state}" in out and _epochs_trained(out) == [1, 2]
    assert cli.states() == []


def test_resume_without_a_state_says_so_instead_of_starting_from_scratch(cli, capsys):
    message = str(_exit(cli, "--resume").value.code)
    assert "nothing to resume" in message and cli.command in message
    assert _epochs_trained(capsys.readouterr().out) == [] and not cli.out.joinpath(f"{TINY.name}.pt").exists()


def test_resume_and_restart_exclude_each_other(cli, capsys):
    assert _exit(cli, "--resume", "--restart").value.code == 2
    assert "not allowed with" in capsys.readouterr().err


def test_the_state_is_keyed_by_the_run_settings(cli, capsys):
    state = _interrupted_run(cli, capsys)
    assert state.name.startswith(f"{TINY.name}.") and state.name != f"{TINY.name}.state.pt"
    assert train.state_path(TINY, 2, 0) == state
    assert len({train.state_path(TINY, 2, 0), train.state_path(TINY, 3, 0), train.state_path(TINY, 2, 1),
                train.state_path(TINY.__class__(**{**TINY.__dict__, "width": 16}), 2, 0)}) == 4
    before = state.read_bytes()
    cli("--seed", "1")  # another run of the same preset neither refuses nor touches this state
    assert _epochs_trained(capsys.readouterr().out) == [1, 2]
    assert cli.states() == [state] and state.read_bytes() == before


@pytest.mark.parametrize("damage", ["truncated", "empty", "not a state"])
def test_a_corrupt_state_gives_a_clear_error(cli, capsys, damage):
    state = _interrupted_run(cli, capsys)
    if damage == "truncated":
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    elif damage == "empty":
        state.write_bytes(b"")
    else:
        torch.save({"weights": torch.zeros(2)}, state)
    for extra in (["--resume"], []):
        message = str(_exit(cli, *extra).value.code)
        assert str(state) in message and f"{cli.command} --restart" in message, message
        assert "Traceback" not in message
    if damage != "not a state":
        assert "truncated or corrupt" in message
    cli("--restart")
    assert _epochs_trained(capsys.readouterr().out) == [1, 2]


def test_read_training_state_names_the_file(tmp_path):
    from course_utils.simclr import TrainingStateError, read_training_state

    bad = tmp_path / "bad.state.pt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(TrainingStateError, match="bad.state.pt.*truncated or corrupt"):
        read_training_state(bad)
    with pytest.raises(FileNotFoundError):
        read_training_state(tmp_path / "missing.pt")


@pytest.mark.parametrize("argv", [["--epochs", "0"], ["--epochs", "-3"], ["--epochs", "two"],
                                  ["--supervised", "0"], ["--snapshots", "0"]])
def test_epochs_must_be_positive_whole_numbers(cli, capsys, argv):
    assert _exit(cli, *argv).value.code == 2
    assert argv[0] in capsys.readouterr().err
    assert cli.data_calls["data"] == 0 and cli.states() == []


def test_an_unwritable_out_is_detected_before_training(cli, capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as info:
        train.main(["--preset", TINY.name, "--out", str(blocker / "checkpoints")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--out" in err and str(blocker / "checkpoints") in err
    assert cli.data_calls["data"] == 0, "checked before loading data or training"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can write anywhere")
def test_a_read_only_out_is_detected_before_training(cli, capsys, tmp_path):
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o500)
    try:
        with pytest.raises(SystemExit) as info:
            train.main(["--preset", TINY.name, "--out", str(read_only)])
    finally:
        read_only.chmod(0o700)
    assert info.value.code == 2 and str(read_only) in capsys.readouterr().err
    assert cli.data_calls["data"] == 0


def test_a_leftover_temp_file_of_a_killed_save_is_removed_on_the_next_save(cli, capsys, tmp_path):
    folder = tmp_path / "data" / "train"
    folder.mkdir(parents=True)
    state = train.state_path(TINY, 2, 0)
    leftovers = [state.with_name(state.name + ".tmp"), folder / f".{state.name}.x1y2z3.tmp"]
    for leftover in leftovers:
        leftover.write_bytes(b"half a state")
    _interrupted_run(cli, capsys)
    assert cli.states() == [state]
    assert not any(leftover.exists() for leftover in leftovers)
    assert sorted(p.name for p in folder.iterdir()) == [state.name]


def test_save_training_state_is_atomic_and_replaces_a_stale_temp_file(tmp_path):
    from course_utils.simclr import save_training_state

    path = tmp_path / "run.state.pt"
    path.with_name("run.state.pt.tmp").write_bytes(b"stale")
    save_training_state(path, {"epoch": 0})
    assert torch.load(path, weights_only=True) == {"epoch": 0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.state.pt"]

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(Exception):
        save_training_state(path, {"epoch": Unsaveable()})
    assert torch.load(path, weights_only=True) == {"epoch": 0}, "a failed save keeps the previous state"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.state.pt"]


def test_a_state_of_the_old_per_preset_layout_is_resumed(cli, capsys):
    state = _interrupted_run(cli, capsys)
    legacy = state.with_name(f"{TINY.name}.state.pt")
    state.rename(legacy)
    cli("--resume")
    assert _epochs_trained(capsys.readouterr().out) == [2]


def test_the_factor_preset_trains_four_models_that_load_back(tmp_path, monkeypatch):
    from course_utils.explain.protovae import AttributeClassifier, ProtoVAE, RepresentationDecoder, load_factor_model

    tiny = train.FactorPreset("tiny-factors", "tiny", n=64, epochs=1, latent_dim=3, classifier_n=64)
    monkeypatch.setitem(train.FACTOR_PRESETS, tiny.name, tiny)
    monkeypatch.setenv("COURSE_DATA_ROOT", str(tmp_path / "data"))
    result = train.main(["--preset", tiny.name, "--out", str(tmp_path)])
    assert set(result["attribute_accuracy"]) == set(tiny.factors) and set(result["minutes"]) == {
        "attribute_classifier", "vae", "protovae", "h_decoder"}
    kinds = {"attributes": AttributeClassifier, "vae": ProtoVAE, "protovae": ProtoVAE, "h-decoder": RepresentationDecoder}
    for part, kind in kinds.items():
        assert isinstance(load_factor_model(tmp_path / f"tiny-factors-{part}.pt", unregistered="allow"), kind)
    assert (tmp_path / "tiny-factors.json").is_file()
    with pytest.raises(SystemExit):  # the SimCLR-only flags are refused
        train.main(["--preset", tiny.name, "--out", str(tmp_path), "--resume"])
