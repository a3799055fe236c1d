"""--track (Weights & Biases, CleanRL's convention) in the three training scripts.

wandb is optional and not in requirements.txt: the first two tests need no wandb; the others run the scripts
with wandb in offline mode (WANDB_MODE=offline, WANDB_DIR in a temp dir) and are skipped when it is not
installed. They check the run's name and config, and that every scalar the script writes to TensorBoard
reaches W&B with the same step and value.
"""
import glob
import inspect
import json
import sys
import typing
from pathlib import Path

import pytest
import torch

import collect_offline as co
import finetune_gsa as ft
import pretrain_wm as pw
from test_finetune import RUN
from test_pretrain import make_dataset
from test_validation import field_help

torch.set_num_threads(1)
SCRIPTS = (co, pw, ft)
FLAGS = ("track", "wandb_project_name", "wandb_entity")


def minimal_args(module, root: Path, **kw):
    if module is co:
        return co.Args(out_dir=str(root / "out"), embodiments="cartpole", episodes_per_embodiment=1,
                       explorer_steps=300, explorer_stages=2, num_workers=1, random_fraction=0.0, **kw)
    if module is pw:
        return pw.Args(**{"data_dir": str(root / "data"), "out_dir": str(root / "out"), "size": "tiny", "steps": 4,
                          "threads": 1, "log_every": 1, "checkpoint_every": 2, "eval_every": 2, "pool_mb": 2,
                          "holdout_fraction": 0.2, **kw})
    return ft.Args(**{**RUN, "task": "cartpole-balance", "no_pretrain": True, "env_steps": 120,
                      "out_dir": str(root / "out"), **kw})


# ---------------------------------------------------------------------------------------------------------
# Without wandb
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("module", SCRIPTS, ids=lambda m: m.SCRIPT)
def test_track_without_wandb_is_a_clear_error_that_writes_nothing(module, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError, installed or not
    if module is pw:
        make_dataset(tmp_path / "data", episodes=2, length=12, embodiments=("walker",))
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as error:
        module.main(minimal_args(module, tmp_path, track=True))
    message = str(error.value.code)  # a message, so the exit status is 1
    assert message.startswith(f"{module.SCRIPT}: error: --track") and "`pip install wandb`" in message, message
    assert sorted(tmp_path.rglob("*")) == before and not (tmp_path / "out").exists()


def test_tracking_helpers_and_flags_are_the_same_in_the_training_scripts():
    for name in ("import_wandb", "start_tracking", "stop_tracking"):
        sources = {m.SCRIPT: inspect.getsource(getattr(m, name)) for m in SCRIPTS}
        assert len(set(sources.values())) == 1, name
    for name in FLAGS:
        assert len({typing.get_type_hints(m.Args)[name] for m in SCRIPTS}) == 1, name
        assert len({field_help(m.Args)[name] for m in SCRIPTS}) == 1, name
        assert len({getattr(m.Args(), name) for m in SCRIPTS}) == 1, name
    assert ft.Args().track is False and ft.Args().wandb_project_name == "gsa"


# ---------------------------------------------------------------------------------------------------------
# With wandb, offline
# ---------------------------------------------------------------------------------------------------------

class Spy:
    """Wraps a wandb Run: records what the script logs, passes everything through to the real run."""

    def __init__(self, run):
        self.run, self.logged = run, []

    def log(self, data, *args, **kwargs):
        self.logged.append(dict(data))
        return self.run.log(data, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.run, name)


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="wandb is optional (pip install wandb); not installed here")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    (tmp_path / "wandb-dir").mkdir()
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # nothing may land in the current directory
    calls, real_init = [], wandb.init

    def init(**kwargs):
        spy = Spy(real_init(**kwargs))
        calls.append((kwargs, spy))
        return spy

    monkeypatch.setattr(wandb, "init", init)
    yield calls
    assert list((tmp_path / "cwd").iterdir()) == []


def tensorboard_scalars(tb_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for events in sorted(glob.glob(str(tb_dir / "events.*"))):
        acc = EventAccumulator(events, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return scalars


def wandb_scalars(logged: list) -> dict:
    """{key: [(x, value)]}: in every logged dict the one key without a "/" is the x-axis of the others."""
    scalars = {}
    for row in logged:
        (axis,) = [k for k in row if "/" not in k]
        for key, value in row.items():
            if key != axis:
                scalars.setdefault(key, []).append((row[axis], value))
    return scalars


def assert_mirrored(tb_dir: Path, logged: list) -> None:
    tb, wb = tensorboard_scalars(tb_dir), wandb_scalars(logged)
    assert sorted(tb) == sorted(wb)
    for tag, points in tb.items():
        assert [s for s, _ in points] == [s for s, _ in wb[tag]], tag
        assert [v for _, v in points] == pytest.approx([v for _, v in wb[tag]], rel=1e-6, abs=1e-6), tag


def offline_run_file(wandb_dir: Path, run_id: str) -> bytes:
    (path,) = glob.glob(str(wandb_dir / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb"))
    return Path(path).read_bytes()


def test_finetune_tracks_config_and_every_tensorboard_scalar(offline_wandb, tmp_path):
    out = tmp_path / "out"
    ft.main(minimal_args(ft, tmp_path, track=True, wandb_project_name="p", wandb_entity=None))
    ((kwargs, run),) = offline_wandb
    assert kwargs["name"] == "cartpole-balance-no-pretrain-s0" and kwargs["project"] == "p"
    assert kwargs["entity"] is None and kwargs["dir"] is None  # $WANDB_DIR wins over <out-dir>
    args = json.loads((out / "args.json").read_text())
    assert kwargs["config"] == {k: args[k] for k in kwargs["config"]} and kwargs["config"]["track"] is True
    assert kwargs["config"]["resolved_size"] == "tiny" and kwargs["config"]["task"] == "cartpole-balance"
    keys = {k for row in run.logged for k in row}
    assert {"eval/return", "episode/return", "train/wm_loss", "env_steps"} <= keys
    assert_mirrored(out / "tb", run.logged)
    run_id = (out / "wandb-run-id").read_text()
    assert run_id == run.id and kwargs["id"] is None
    assert b"cartpole-balance-no-pretrain-s0" in offline_run_file(tmp_path / "wandb-dir", run_id)

    # --resume continues the same W&B run; its rows start after the checkpoint
    ft.main(minimal_args(ft, tmp_path, track=True, resume=True, env_steps=200))
    kwargs, resumed = offline_wandb[1]
    assert kwargs["id"] == run_id and kwargs["resume"] == "allow"
    assert min(row["env_steps"] for row in resumed.logged) > 120


def test_finetune_tracks_the_prior_against_its_own_step(offline_wandb, tmp_path):
    from test_finetune import make_artifacts

    arts = make_artifacts(tmp_path / "up")
    out = tmp_path / "out"
    ft.main(ft.Args(**{**RUN, "task": "walker-walk", "env_steps": 80, "out_dir": str(out), "track": True, **arts}))
    ((kwargs, run),) = offline_wandb
    assert kwargs["name"] == "walker-walk-gsa-s0"
    bc = [row for row in run.logged if "bc/heldout_mse" in row]
    assert bc and all(set(row) == {"bc_step", "bc/heldout_mse"} for row in bc)
    assert_mirrored(out / "tb", run.logged)


def test_pretrain_tracks_config_and_every_tensorboard_scalar(offline_wandb, tmp_path):
    make_dataset(tmp_path / "data", episodes=2, length=12, embodiments=("walker", "cartpole"))
    pw.main(minimal_args(pw, tmp_path, track=True))
    ((kwargs, run),) = offline_wandb
    assert kwargs["name"] == "pretrain-tiny-cartpole+walker-s0" and kwargs["project"] == "gsa"
    assert kwargs["config"] == json.loads((tmp_path / "out" / "args.json").read_text())
    assert any("openloop_mse/walker" in row for row in run.logged)
    assert_mirrored(tmp_path / "out" / "tb", run.logged)
    pw.main(minimal_args(pw, tmp_path, track=True, resume=True, steps=6))
    assert offline_wandb[1][0]["id"] == run.id


def test_collect_tracks_config_and_every_tensorboard_scalar(offline_wandb, tmp_path):
    co.main(minimal_args(co, tmp_path, track=True))
    ((kwargs, run),) = offline_wandb
    assert kwargs["name"] == "collect-cartpole-s0"
    assert kwargs["config"] == json.loads((tmp_path / "out" / "args.json").read_text())
    assert any("explorer/cartpole/rnd_error" in row for row in run.logged)
    assert_mirrored(tmp_path / "out" / "tb", run.logged)
