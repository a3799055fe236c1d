"""finetune_gsa.py: every input is checked before anything is written, and a damaged file is named (issue 16)."""
import errno
import io
import json
import typing
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch

import finetune_gsa as ft
from test_finetune import RUN, make_artifacts, run_main

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return make_artifacts(tmp_path_factory.mktemp("upstream"))


def numeric_fields(cls):
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        kinds = set(typing.get_args(hints[f.name])) or {hints[f.name]}
        if kinds & {int, float} and hints[f.name] is not bool:
            out.append(f.name)
    return out


def test_every_numeric_flag_has_a_range():
    assert sorted(numeric_fields(ft.Args)) == sorted(ft.ARG_RANGES)


@pytest.mark.parametrize("name", sorted(ft.ARG_RANGES))
def test_out_of_range_values_fail_before_anything_is_written(tmp_path, name):
    low, high = ft.ARG_RANGES[name]
    is_int = int in (set(typing.get_args(typing.get_type_hints(ft.Args)[name])) or {typing.get_type_hints(ft.Args)[name]})
    step = 1 if is_int else 1e-3 * max(1.0, abs(low if low is not None else high))
    bad = ([low - step] if low is not None else []) + ([high + step] if high is not None else [])
    if not is_int:
        bad.append(float("nan"))
    flag = "--" + name.replace("_", "-")
    for value in bad:
        out = tmp_path / f"run-{value}"
        with pytest.raises(SystemExit, match=flag):
            run_main(task="cartpole-balance", no_pretrain=True, out_dir=str(out), **{name: value})
        assert not out.exists()


def test_out_dir_that_is_a_file_is_named(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SystemExit, match="is not a directory"):
        run_main(task="cartpole-balance", no_pretrain=True, out_dir=str(f))
    assert f.read_text() == "x"


def test_torn_last_log_line_does_not_block_resume(tmp_path):
    out = tmp_path / "run"
    common = dict(task="cartpole-balance", no_pretrain=True, out_dir=str(out))
    run_main(env_steps=80, **common)
    with open(out / "train.jsonl", "a") as f:
        f.write('{"env_steps": 12')  # a kill in the middle of a write
    run_main(env_steps=120, resume=True, **common)
    lines = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert [x["env_steps"] for x in lines] == [80, 120]


def test_resume_keeps_the_runs_own_preset_flags(tmp_path):
    # A run saved with --critic-lr 3e-4 resumes with the flag left out and keeps 3e-4; an older run saved
    # critic_lr 8e-5 as a plain default, and it resumes too. A flag given with another value is refused.
    out = tmp_path / "run"
    common = dict(task="cartpole-balance", no_pretrain=True, out_dir=str(out))
    run_main(env_steps=80, critic_lr=3e-4, critic_bootstrap="fast", **common)
    run_main(env_steps=120, resume=True, **common)
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    assert ckpt["counters"]["env_frames"] == 120 and ckpt["optimizers"]["critic"]["param_groups"][0]["lr"] == 3e-4
    with pytest.raises(SystemExit, match=r"critic_lr \(0.0003 there, 0.001 now\)"):
        run_main(env_steps=160, resume=True, critic_lr=1e-3, **common)


@pytest.mark.parametrize("saved_in", ["checkpoint", "args.json"])
def test_resume_keeps_the_runs_own_preset_when_the_presets_change(tmp_path, monkeypatch, saved_in):
    # A run started under one version's preset (here tiny's train ratio 16) resumes under a version whose preset
    # differs (32): it keeps 16, so it neither changes its ratio mid-run nor owes a burst of catch-up updates.
    # Runs checkpointed before the preset was saved in ckpt.pt fall back to their args.json's "resolved".
    out = tmp_path / "run"
    common = dict(task="cartpole-balance", no_pretrain=True, out_dir=str(out))
    run_main(env_steps=80, **common)
    before = torch.load(out / "ckpt.pt", weights_only=False)
    assert before["preset"]["train_ratio"] == 16
    if saved_in == "args.json":
        del before["preset"]
        torch.save(before, out / "ckpt.pt")
    monkeypatch.setitem(ft.AGENT_SIZES, "tiny", {**ft.AGENT_SIZES["tiny"], "train_ratio": 32})
    run_main(env_steps=160, resume=True, **common)
    after = torch.load(out / "ckpt.pt", weights_only=False)
    assert after["preset"]["train_ratio"] == 16 and after["args"]["train_ratio"] == 16
    B, L = after["preset"]["batch_size"], after["preset"]["seq_len"]
    c = after["counters"]
    assert c["updates"] == (c["agent_steps"] - c["train_origin"]) * 16 // (B * L)  # no burst at ratio 32
    run_main(env_steps=200, resume=True, **{**common, "out_dir": str(tmp_path / "fresh")})  # a new run: 32
    assert torch.load(tmp_path / "fresh" / "ckpt.pt", weights_only=False)["preset"]["train_ratio"] == 32


def test_non_finite_or_out_of_bounds_offline_action_is_named_at_load(tmp_path):
    for bad in (float("nan"), 1e38):
        root = tmp_path / f"up-{bad}"
        root.mkdir()
        arts = make_artifacts(root)
        data = Path(arts["data_dir"])
        manifest = json.loads((data / "manifest.json").read_text())
        row = next(r for r in manifest["episodes"] if r["embodiment"] == "walker")
        with np.load(data / row["path"]) as z:
            ep = {k: z[k] for k in z.files}
        ep["action"][5, 2] = bad
        buf = io.BytesIO()
        np.savez_compressed(buf, **ep)
        (data / row["path"]).write_bytes(buf.getvalue())
        row["sha256"] = ft.sha256_bytes(buf.getvalue())  # a consistent dataset that holds a bad value
        (data / "manifest.json").write_text(json.dumps(manifest))
        meta_path = Path(arts["index_dir"]) / "index.json"
        meta = json.loads(meta_path.read_text())
        meta["manifest_sha256"] = ft.sha256_file(data / "manifest.json")
        meta_path.write_text(json.dumps(meta))
        out = root / "run"
        with pytest.raises(SystemExit, match=rf"{row['path']} has an action outside \[-1, 1\] or not finite"):
            run_main(task="walker-walk", out_dir=str(out), **arts)


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_damaged_run_checkpoint_is_named(tmp_path, damage):
    out = tmp_path / "run"
    common = dict(task="cartpole-balance", no_pretrain=True, out_dir=str(out))
    run_main(env_steps=40, **common)
    raw = (out / "ckpt.pt").read_bytes()
    (out / "ckpt.pt").write_bytes(raw[: len(raw) // 2] if damage == "truncated"
                                  else np.random.default_rng(0).bytes(4096))
    with pytest.raises(SystemExit, match=r"ckpt.pt \(the run's checkpoint\) is damaged"):
        run_main(env_steps=80, resume=True, **common)


@pytest.mark.parametrize("target", ["checkpoint", "index.json", "index.faiss"])
def test_damaged_upstream_file_is_named(tmp_path, target):
    arts = make_artifacts(tmp_path / "up")
    path = Path(arts["checkpoint"]) if target == "checkpoint" else Path(arts["index_dir"]) / target
    path.write_bytes(path.read_bytes()[:100])
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=rf"{path.name}.*(damaged|not a)"):
        run_main(task="walker-walk", out_dir=str(out), **arts)
    assert not out.exists()


def test_disk_full_removes_the_temporary_file_and_says_so(tmp_path, monkeypatch):
    real_open = open

    class FullFile(io.BytesIO):
        def __init__(self, path):
            super().__init__()
            self.path = path
            real_open(path, "wb").close()  # the temporary file exists, as on a real disk

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr("builtins.open", lambda p, mode="r", *a, **k: FullFile(p) if "w" in mode else real_open(p, mode, *a, **k))
    with pytest.raises(SystemExit, match="No space left on device while writing .*x.json"):
        with ft.fail_on_full_disk("continue with --resume"):
            ft.write_atomic(tmp_path / "x.json", b"{}")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_stale_temporary_files_are_swept_on_resume(tmp_path):
    out = tmp_path / "run"
    common = dict(task="cartpole-balance", no_pretrain=True, out_dir=str(out))
    run_main(env_steps=40, **common)
    stale = out / "ckpt.pt.tmp-999999999"
    stale.write_bytes(b"partial")
    run_main(env_steps=80, resume=True, **common)
    assert not stale.exists()


def test_diverged_weights_stop_the_run_before_the_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = ft.Agent.update

    def poisoned(self, batch):
        m = real(self, batch)
        with torch.no_grad():
            self.actor.net.out.bias.fill_(float("inf"))
        return m

    monkeypatch.setattr(ft.Agent, "update", poisoned)
    with pytest.raises(SystemExit, match="weights of the actor are no longer finite"):
        run_main(task="cartpole-balance", no_pretrain=True, out_dir=str(out), env_steps=120)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["actor"].values())


def test_file_helpers_are_the_same_in_every_stage_script():
    import inspect

    import collect_offline
    import pretrain_wm
    import retrieval
    for name in ("write_atomic", "write_json_atomic", "sweep_stale_temporaries", "pid_running", "check_out_dir",
                 "check_ranges", "fail_on_full_disk"):
        source = inspect.getsource(getattr(ft, name))
        for module in (collect_offline, pretrain_wm, retrieval):
            assert inspect.getsource(getattr(module, name)) == source, (module.__name__, name)


def test_format_versions_agree_with_the_scripts_that_write_them():
    import pretrain_wm
    import retrieval
    assert ft.WM_CHECKPOINT_FORMAT_VERSION == pretrain_wm.CHECKPOINT_FORMAT_VERSION
    assert ft.INDEX_FORMAT_VERSION == retrieval.INDEX_FORMAT_VERSION
