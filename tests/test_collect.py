"""Tests of collect_offline.py: on-disk format, manifest, resume determinism, reward-freeness, scripted experts,
sharding and clear errors. Tiny settings throughout (one episode per embodiment, a few hundred explorer steps)."""
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import collect_offline as co

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:Constant\\(s\\) may be too high")
TINY = dict(embodiments="cartpole,sawyer", episodes_per_embodiment=1, mw_tasks="reach", explorer_steps=300,
            explorer_stages=2, num_workers=1, random_fraction=0.0)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("data")
    args = co.Args(out_dir=str(out), **TINY)
    co.main(args)
    return out, args


def test_episode_files_have_the_contract_format(collection):
    out, _ = collection
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format_version"] == co.MANIFEST_FORMAT_VERSION
    assert manifest["image_size"] == 64 and manifest["action_repeat"] == 2
    assert manifest["max_action_dim"] == 12 and manifest["action_dims"] == co.ACTION_DIMS
    rows = manifest["episodes"]
    assert [r["path"] for r in rows] == sorted(r["path"] for r in rows) == [
        "cartpole/cartpole-000000.npz", "sawyer/reach-000000.npz"]
    for row in rows:
        assert set(row) == {"path", "embodiment", "task", "length", "policy", "noise_scale", "seed", "sha256"}
        assert row["sha256"] == sha(out / row["path"])
        T, A = row["length"], co.ACTION_DIMS[row["embodiment"]]
        assert T == (100 if row["embodiment"] == "sawyer" else 500)
        with np.load(out / row["path"], allow_pickle=False) as z:
            assert sorted(z.files) == ["action", "image", "is_first"]  # no reward, ever
            image, action, is_first = z["image"], z["action"], z["is_first"]
        assert image.shape == (T + 1, 64, 64, 3) and image.dtype == np.uint8
        assert action.shape == (T + 1, A) and action.dtype == np.float32
        assert is_first.shape == (T + 1,) and is_first.dtype == bool and is_first[0] and not is_first[1:].any()
        assert (action[0] == 0).all() and np.abs(action).max() <= 1.0 and np.abs(action[1:]).max() > 0
        assert image[1:].std() > 1 and (image[0] != image[-1]).any()  # real, changing frames
    assert rows[0]["task"] == "swingup" and rows[0]["policy"].startswith("explore-rnd-stage")
    assert rows[1]["task"] == "reach" and rows[1]["policy"] == "scripted"
    assert (out / "contact_sheet.png").stat().st_size > 0
    assert json.loads((out / "args.json").read_text())["seed"] == 0
    assert "reward" not in (out / "manifest.json").read_text()


def test_resume_after_kill_gives_identical_bytes(collection, tmp_path):
    out, args = collection
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    # Simulate a run killed at various points: a lost episode (npz + row), a row-less episode, a torn
    # temporary file, a truncated episode, no manifest, and no explorer snapshots (retrained identically).
    (resumed / "cartpole/cartpole-000000.npz").unlink()
    (resumed / "cartpole/cartpole-000000.json").unlink()
    (resumed / "sawyer/reach-000000.json").unlink()
    (resumed / "sawyer/reach-000000.npz.tmp-999").write_bytes(b"partial")
    (resumed / "manifest.json").unlink()
    shutil.rmtree(resumed / "_explorer")
    co.main(replace(args, out_dir=str(resumed)))
    a = json.loads((out / "manifest.json").read_text())["episodes"]
    b = json.loads((resumed / "manifest.json").read_text())["episodes"]
    assert a == b
    # The manifest's bytes (its sha256 is what later stages record) do not depend on how it was run.
    co.main(replace(args, out_dir=str(resumed), num_workers=args.num_workers + 1))
    assert sha(resumed / "manifest.json") == sha(out / "manifest.json")
    for row in b:
        assert sha(resumed / row["path"]) == row["sha256"]
    # A truncated episode file is detected by its sha256 and redone.
    victim = resumed / "cartpole/cartpole-000000.npz"
    victim.write_bytes(victim.read_bytes()[:1000])
    co.main(replace(args, out_dir=str(resumed)))
    assert sha(victim) == a[0]["sha256"]


def test_spawn_workers_give_the_same_bytes(collection, tmp_path):
    out, args = collection
    other = tmp_path / "pool"
    other.mkdir()
    shutil.copytree(out / "_explorer", other / "_explorer")  # cached snapshots: no retraining here
    co.main(replace(args, out_dir=str(other), embodiments="cartpole", num_workers=2))
    assert sha(other / "cartpole/cartpole-000000.npz") == sha(out / "cartpole/cartpole-000000.npz")


def test_explorer_and_dmc_collection_never_touch_the_task_reward(monkeypatch, tmp_path):
    from dm_control.rl import control

    torch.set_num_threads(1)
    env = co.RewardFreeDMC("cartpole")

    def poisoned(*_, **__):
        raise AssertionError("the task reward was read")

    monkeypatch.setattr(type(env.task), "get_reward", poisoned)
    monkeypatch.setattr(control.Environment, "step", poisoned)  # the reward-computing step is never used
    assert isinstance(env.reset(0), np.ndarray) and isinstance(env.step(np.zeros(1)), np.ndarray)
    snaps = co.train_explorer(env, 120, 1, seed=0)
    assert len(snaps) == 1
    spec = {"path": "x", "embodiment": "cartpole", "task": "swingup", "length": 5, "policy": "random",
            "noise_scale": None, "seed": 3}
    co._CACHE["cartpole"] = env
    try:
        ep = co.rollout(spec, tmp_path)
    finally:
        co._CACHE.pop("cartpole")
    assert set(ep) >= {"image", "action", "is_first"} and "reward" not in ep


@pytest.mark.parametrize("task", ["reach", "button-press", "drawer-open"])
def test_noise_free_scripted_expert_succeeds(task, tmp_path):
    spec = {"path": "x", "embodiment": "sawyer", "task": task, "length": 100, "policy": "scripted",
            "noise_scale": 0.0, "seed": 7}
    ep = co.rollout(spec, tmp_path)
    assert any(ep["successes"]), f"{task}: scripted expert never succeeded in 100 agent steps"


def test_plan_is_deterministic_and_shards_partition_it():
    args = co.Args(embodiments="all", episodes_per_embodiment=3, mw_episodes_per_task=2)
    full = co.plan_all(args)
    assert len(full) == 5 * 3 + 50 * 2 and len({s["path"] for s in full}) == len(full)
    shards = [co.plan_all(replace(args, shard=f"{k}/3")) for k in (1, 2, 3)]
    assert sorted(s["path"] for sh in shards for s in sh) == sorted(s["path"] for s in full)
    assert all(len(sh) > 0 for sh in shards)
    # An episode's spec depends on (seed, embodiment, task, index) only, not on how many are collected.
    more = co.plan_all(replace(args, episodes_per_embodiment=5, mw_episodes_per_task=4))
    by_path = {s["path"]: s for s in more}
    assert all(by_path[s["path"]] == s for s in full)
    assert co.plan_all(replace(args, seed=1))[0]["seed"] != full[0]["seed"]
    policies = {s["policy"] for s in co.plan_all(replace(args, episodes_per_embodiment=40))}
    assert "random" in policies and "scripted" in policies and "explore-rnd-stage4" in policies


@pytest.mark.parametrize("change, message", [
    (dict(embodiments="walker,spider"), "unknown embodiment 'spider'"),
    (dict(mw_tasks="reach,fly"), "unknown Meta-World task 'fly'"),
    (dict(shard="3/2"), "--shard"),
    (dict(shard="one/2"), "--shard"),
    (dict(episodes_per_embodiment=0), "--episodes-per-embodiment must be >= 1, got 0"),
    (dict(mw_episodes_per_task=-1), "--mw-episodes-per-task must be >= 1, got -1"),
    (dict(num_workers=0), "--num-workers must be >= 1"),
    (dict(random_fraction=1.5), "--random-fraction must be in \\[0.0, 1.0\\]"),
    (dict(mw_noise_min=0.5, mw_noise_max=0.2), "--mw-noise-min 0.5 exceeds --mw-noise-max 0.2"),
    (dict(explorer_steps=3, explorer_stages=4), "--explorer-stages 4 exceeds --explorer-steps 3"),
])
def test_bad_arguments_fail_clearly_and_write_nothing(change, message, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(SystemExit, match=f"collect_offline.py: error: .*{message}"):
        co.main(co.Args(out_dir=str(out), **change))
    assert not out.exists()


def test_mw_episodes_per_task_is_used_as_given():
    # An explicit count is never replaced by --episodes-per-embodiment (only None means "the same").
    specs = co.plan_all(co.Args(embodiments="sawyer", mw_tasks="reach", episodes_per_embodiment=3,
                                mw_episodes_per_task=1))
    assert [s["path"] for s in specs] == ["sawyer/reach-000000.npz"]


def test_smaller_selection_is_refused_unless_allowed(collection, tmp_path):
    out, args = collection
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    smaller = replace(args, out_dir=str(copy), embodiments="cartpole")
    with pytest.raises(SystemExit, match=r"would drop 1 of the 2 episodes listed in .*manifest.json "
                                         r"\(sawyer/reach: 1\); .* or pass --allow-shrink"):
        co.main(smaller)
    assert before == {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}  # nothing written
    co.main(replace(smaller, allow_shrink=True))
    rows = json.loads((copy / "manifest.json").read_text())["episodes"]
    assert [r["path"] for r in rows] == ["cartpole/cartpole-000000.npz"]
    assert (copy / "sawyer/reach-000000.npz").is_file()  # dropped from the manifest, not deleted
    # The full selection grows it back, reusing the files: the same manifest bytes as the original.
    co.main(replace(args, out_dir=str(copy)))
    assert sha(copy / "manifest.json") == sha(out / "manifest.json")


def test_unreadable_manifest_is_named(collection, tmp_path):
    out, args = collection
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "manifest.json").write_text('{"episodes": [{"path": ')
    with pytest.raises(SystemExit, match=r"manifest.json is unreadable; delete it and re-run"):
        co.main(replace(args, out_dir=str(copy)))


def dead_pid() -> int:
    """The id of a process that has exited: a temporary file named with it is stale."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_full_disk_removes_temporaries_and_a_rerun_finishes(collection, tmp_path, monkeypatch):
    out, args = collection
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    for suffix in (".npz", ".json"):  # one episode left to collect
        (copy / f"sawyer/reach-000000{suffix}").unlink()
    (copy / f"sawyer/reach-000000.npz.tmp-{dead_pid()}").write_bytes(b"left by a killed run")
    with open(copy / "metrics.jsonl", "a") as f:
        f.write('{"path": "cartpole/cartpole-0')  # torn by a kill
    real_fsync = os.fsync

    def full_disk_for_episodes(fd):
        if ".npz.tmp-" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk_for_episodes)
    with pytest.raises(SystemExit, match=r"No space left on device while writing .*sawyer/reach-000000.npz; "
                                         r"free some space and re-run the same command"):
        co.main(replace(args, out_dir=str(copy)))
    assert not [p for p in copy.rglob("*") if ".tmp-" in p.name]  # the stale one swept, its own removed
    monkeypatch.setattr(os, "fsync", real_fsync)
    co.main(replace(args, out_dir=str(copy)))
    assert sha(copy / "manifest.json") == sha(out / "manifest.json")
    for line in (copy / "metrics.jsonl").read_text().splitlines():
        json.loads(line)  # the torn line was cut, so appended rows start lines of their own


def spawn_workers(pid: int) -> list:
    """Ids of the pool workers (spawn context) whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat, cmdline = (entry / "stat").read_text(), (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is done
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_workers_stop_with_the_parent(sig, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "collect_offline.py"), "--out-dir", str(out), "--embodiments", "sawyer",
           "--mw-tasks", "reach,push", "--episodes-per-embodiment", "8", "--num-workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    workers = []
    try:
        # Both workers are inside a chunk of 8 episodes (one per task) once each has written its first one.
        deadline = time.time() + 240
        while not all(list((out / "sawyer").glob(f"{t}-*.npz")) for t in ("reach", "push")):
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "timeout"
            workers = spawn_workers(proc.pid) or workers
            time.sleep(0.1)
        assert len(workers) == 2
        proc.send_signal(sig)
        proc.wait(timeout=30)
        t0 = time.time()
        while any(running(w) for w in workers) and time.time() - t0 < 10:
            time.sleep(0.1)
        assert not any(running(w) for w in workers), "workers outlived their parent"
        if sig == signal.SIGTERM:
            assert proc.returncode == 1 and "stopped by SIGTERM" in proc.stderr.read()
    finally:
        proc.kill()
        for w in workers:
            if running(w):
                os.kill(w, signal.SIGKILL)


def test_rerun_with_other_content_settings_is_refused(collection):
    out, args = collection
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(SystemExit, match="different seed"):
        co.main(replace(args, seed=5))
    assert (out / "manifest.json").read_bytes() == before


def test_command_line_error_exit_code(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "collect_offline.py"), "--out-dir", str(out),
                           "--embodiments", "spider"], capture_output=True, text=True,
                          env=dict(os.environ, MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl")))
    assert proc.returncode != 0
    assert "collect_offline.py: error: unknown embodiment 'spider'" in proc.stderr
    assert not out.exists()


def test_every_flag_is_used():
    # Read from the code's structure: every Args field is read as `args.<field>` somewhere outside Args itself.
    import ast
    import inspect
    from dataclasses import fields

    tree = ast.parse(inspect.getsource(co))
    used = {node.attr for top in tree.body if not (isinstance(top, ast.ClassDef) and top.name == "Args")
            for node in ast.walk(top)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "args"}
    unused = [f.name for f in fields(co.Args) if f.name not in used]
    assert not unused, f"flags that do nothing: {unused}"


def test_numpy_actor_matches_torch_actor():
    torch.manual_seed(0)
    actor = co.Actor(24, 6)
    obs = np.random.default_rng(0).normal(size=(5, 24)).astype(np.float32) * 3
    with torch.no_grad():
        expected = actor(torch.as_tensor(obs)).numpy()
    fast = co.NumpyActor(actor)
    np.testing.assert_allclose(np.stack([fast(o.astype(np.float64)) for o in obs]), expected, atol=1e-5)
