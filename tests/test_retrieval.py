"""Tests of retrieval.py (Eq. 4): encoder parity with pretrain_wm.py, exact search, index files, errors."""
import ast
import dataclasses
import errno
import hashlib
import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

import pretrain_wm
import retrieval

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)
faiss.omp_set_num_threads(1)

# One colour and one bar position per embodiment: first frames that any encoder can tell apart.
COLOURS = {"cartpole": (230, 30, 30), "acrobot": (30, 200, 30), "walker": (30, 30, 230),
           "cheetah": (230, 230, 30), "quadruped": (200, 30, 200), "sawyer": (30, 200, 200)}
TINY = dict(cnn_depth=4, deter=32, hidden=32, stoch=4, classes=4, blocks=2)


def synthetic_frame(embodiment: str, rng: np.random.Generator) -> np.ndarray:
    img = np.empty((64, 64, 3), np.int64)
    img[:] = COLOURS[embodiment]
    x = 4 + 8 * retrieval.EMBODIMENTS.index(embodiment)
    img[8:40, x:x + 12] = 255 - np.array(COLOURS[embodiment])
    return np.clip(img + rng.integers(-10, 11, img.shape), 0, 255).astype(np.uint8)


def make_dataset(root: Path, per_embodiment: int = 3, steps: int = 3, seed: int = 0) -> Path:
    """A data directory as collect_offline.py writes one: manifest.json and <embodiment>/<name>.npz files."""
    rng, episodes = np.random.default_rng(seed), []
    for emb in retrieval.EMBODIMENTS:
        (root / emb).mkdir(parents=True, exist_ok=True)
        for j in range(per_embodiment):
            image = np.stack([synthetic_frame(emb, rng) for _ in range(steps + 1)])
            action = np.zeros((steps + 1, retrieval.ACTION_DIMS[emb]), np.float32)
            is_first = np.zeros(steps + 1, bool)
            is_first[0] = True
            path = root / emb / f"{emb}-{j:06d}.npz"
            np.savez_compressed(path, image=image, action=action, is_first=is_first)
            episodes.append({"path": f"{emb}/{path.name}", "embodiment": emb,
                             "task": f"mwtask{j % 2}" if emb == "sawyer" else "walk", "length": steps,
                             "policy": "synthetic", "noise_scale": None, "seed": j,
                             "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    episodes.sort(key=lambda e: e["path"])
    manifest = {"format_version": retrieval.MANIFEST_FORMAT_VERSION, "image_size": 64, "action_repeat": 2,
                "max_action_dim": 12, "action_dims": dict(retrieval.ACTION_DIMS), "collection": {},
                "episodes": episodes}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def make_checkpoint(path: Path, seed: int = 0) -> Path:
    """A pretrain_wm.py-format checkpoint of an untrained tiny world model (pretrain_wm's own classes)."""
    torch.manual_seed(seed)
    cfg = pretrain_wm.ModelConfig(**TINY)
    model = pretrain_wm.WorldModel(cfg)
    torch.save({"format_version": pretrain_wm.CHECKPOINT_FORMAT_VERSION, "script": "pretrain_wm.py", "args": {},
                "model_config": dataclasses.asdict(cfg), "model": model.state_dict(), "step": 0,
                "embodiments": list(retrieval.EMBODIMENTS), "manifest_sha256": ""}, path)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Synthetic data + tiny checkpoint + a flat index built through retrieval.main."""
    root = tmp_path_factory.mktemp("retrieval")
    data = make_dataset(root / "data")
    ckpt = make_checkpoint(root / "wm.pt")
    retrieval.main(retrieval.BuildArgs(out_dir=str(root / "index"), checkpoint=str(ckpt), data_dir=str(data),
                                       batch_size=4))
    return root


def brute_force(features, queries, k, action_dims=None, action_dim=None):
    """Eq. 4 by hand: min over queries of the squared L2 distance, ascending, ties by row."""
    d = ((queries[:, None, :].astype(np.float64) - features[None].astype(np.float64)) ** 2).sum(-1).min(0)
    rows = np.arange(len(features))
    if action_dim is not None:
        rows = rows[action_dims == action_dim]
    rows = rows[np.lexsort((rows, d[rows]))][:k]
    return rows, d[rows]


# ---------------------------------------------------------------------------------------------------------

def test_format_versions_agree_with_the_scripts_that_write_the_files():
    import collect_offline

    assert retrieval.MANIFEST_FORMAT_VERSION == collect_offline.MANIFEST_FORMAT_VERSION
    assert retrieval.CHECKPOINT_FORMAT_VERSION == pretrain_wm.CHECKPOINT_FORMAT_VERSION


def test_shared_classes_are_verbatim_copies_of_pretrain_wm():
    for name in ("ModelConfig", "Encoder", "ChannelNorm", "BlockLinear", "_trunc_normal_init"):
        assert inspect.getsource(getattr(retrieval, name)) == inspect.getsource(getattr(pretrain_wm, name)), name
    cfg = pretrain_wm.ModelConfig(**TINY)
    model = pretrain_wm.WorldModel(cfg).eval()
    encoder = retrieval.Encoder(retrieval.ModelConfig(**dataclasses.asdict(cfg))).eval()
    state = {k[len("encoder."):]: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
    encoder.load_state_dict(state, strict=True)
    image = torch.randint(0, 256, (2, 3, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(encoder(image), model.encoder(image))
    assert encoder.out_dim == 8 * cfg.cnn_depth * 4 * 4


@pytest.mark.parametrize("action_dim", [None, 6, 12])
@pytest.mark.parametrize("k", [1, 17, 1000])
def test_retrieve_equals_brute_force(k, action_dim):
    rng = np.random.default_rng(0)
    features = rng.standard_normal((300, 24)).astype(np.float32)
    queries = rng.standard_normal((3, 24)).astype(np.float32)
    action_dims = rng.choice([1, 4, 6, 12], size=300, p=[0.4, 0.3, 0.25, 0.05])
    meta = {"rows": [{"path": f"e{i}.npz", "action_dim": int(a)} for i, a in enumerate(action_dims)]}
    index = faiss.IndexFlatL2(24)
    index.add(features)
    got = retrieval.retrieve(index, meta, queries, k, action_dim)
    rows, dist = brute_force(features, queries, k, action_dims, action_dim)
    assert [r["path"] for r, _ in got] == [f"e{i}.npz" for i in rows]
    np.testing.assert_allclose([d for _, d in got], dist, rtol=1e-4, atol=1e-4)
    if action_dim is not None:
        assert all(r["action_dim"] == action_dim for r, _ in got)
    # an IVF index that probes every cluster is exact too
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(24), 24, 8)
    ivf.train(features)
    ivf.add(features)
    ivf.nprobe = 8
    assert [r["path"] for r, _ in retrieval.retrieve(ivf, meta, queries, k, action_dim)] == [r["path"] for r, _ in got]


def test_retrieve_rejects_bad_input():
    index = faiss.IndexFlatL2(4)
    index.add(np.zeros((2, 4), np.float32))
    meta = {"rows": [{"action_dim": 1}, {"action_dim": 1}]}
    assert retrieval.retrieve(index, meta, np.zeros((1, 4)), 5, action_dim=6) == []
    with pytest.raises(ValueError):
        retrieval.retrieve(index, meta, np.zeros((1, 3)), 5)
    with pytest.raises(ValueError):
        retrieval.retrieve(index, {"rows": [{"action_dim": 1}]}, np.zeros((1, 4)), 5)


def test_build_writes_index_and_sidecar_that_round_trip(built):
    index, meta = retrieval.load_index(built / "index")
    manifest = json.loads((built / "data" / "manifest.json").read_text())
    assert meta["checkpoint_sha256"] == hashlib.sha256((built / "wm.pt").read_bytes()).hexdigest()
    assert meta["manifest_sha256"] == hashlib.sha256((built / "data" / "manifest.json").read_bytes()).hexdigest()
    assert meta["metric"] == "l2" and meta["index_type"] == "flat" and meta["feature_dim"] == 512
    assert [r["path"] for r in meta["rows"]] == [e["path"] for e in manifest["episodes"]]
    assert all(r["action_dim"] == retrieval.ACTION_DIMS[r["embodiment"]] for r in meta["rows"])
    assert not [p for p in (built / "index").iterdir() if ".tmp-" in p.name]
    # stored features = encoder(first frame); the file reads back to the same search results
    encoder, _, _ = retrieval.load_encoder(built / "wm.pt", "cpu")
    first = np.stack([np.load(built / "data" / e["path"])["image"][0] for e in manifest["episodes"]])
    features = retrieval.encode(encoder, first, "cpu")
    np.testing.assert_allclose(index.reconstruct_n(0, index.ntotal), features, rtol=1e-5, atol=1e-5)
    copy = faiss.deserialize_index(faiss.serialize_index(index))  # write + read back in memory
    for other in (copy, faiss.read_index(str(built / "index" / "index.faiss"))):
        assert [x.tolist() for x in index.search(features[:3], 5)] == [x.tolist() for x in other.search(features[:3], 5)]


def test_each_embodiment_retrieves_itself_first(built):
    index, meta = retrieval.load_index(built / "index")
    encoder, _, _ = retrieval.load_encoder(built / "wm.pt", "cpu", meta["checkpoint_sha256"])
    rng = np.random.default_rng(123)  # fresh frames, not the stored ones
    for emb in retrieval.EMBODIMENTS:
        query = retrieval.encode(encoder, synthetic_frame(emb, rng)[None], "cpu")
        results = retrieval.retrieve(index, meta, query, 3)
        assert [r["embodiment"] for r, _ in results] == [emb] * 3, emb


def test_query_cli_path_writes_grid_and_results(built):
    rng = np.random.default_rng(5)
    np.save(built / "walker.npy", np.stack([synthetic_frame("walker", rng) for _ in range(2)]))
    out = built / "diag" / "walker.png"
    retrieval.main(retrieval.QueryArgs(index_dir=str(built / "index"), query_images=str(built / "walker.npy"),
                                       k=4, action_dim=6, grid=4, out=str(out)))
    assert out.stat().st_size > 0
    summary = json.loads(out.with_suffix(".json").read_text())
    assert [r["embodiment"] for r in summary["results"]][:3] == ["walker"] * 3
    assert len(summary["results"]) == 4 and summary["results"][3]["embodiment"] == "cheetah"  # same action dim


def test_ivf_build(built, tmp_path):
    retrieval.main(retrieval.BuildArgs(out_dir=str(tmp_path / "ivf"), checkpoint=str(built / "wm.pt"),
                                       data_dir=str(built / "data"), index_type="ivf", nlist=2, nprobe=2))
    index, meta = retrieval.load_index(tmp_path / "ivf")
    assert meta["index_type"] == "ivf2,flat" and meta["nprobe"] == 2 and index.ntotal == 18


def test_clear_errors_and_nothing_overwritten(built, tmp_path):
    index_files = {p.name: p.read_bytes() for p in (built / "index").iterdir()}
    build = dict(out_dir=str(built / "index"), checkpoint=str(built / "wm.pt"), data_dir=str(built / "data"))
    with pytest.raises(SystemExit, match="already holds an index"):
        retrieval.main(retrieval.BuildArgs(**build))
    with pytest.raises(SystemExit, match="does not exist"):
        retrieval.main(retrieval.BuildArgs(**{**build, "checkpoint": str(tmp_path / "nope.pt"), "overwrite": True}))
    with pytest.raises(SystemExit, match="index.faiss does not exist"):
        retrieval.main(retrieval.QueryArgs(index_dir=str(tmp_path / "nothing"), task="walker-walk"))
    with pytest.raises(SystemExit, match="unknown task"):
        retrieval.main(retrieval.QueryArgs(index_dir=str(built / "index"), task="walker-fly"))
    # a corrupt episode file: sha256 mismatch, and the old index survives --overwrite
    bad = tmp_path / "data"
    make_dataset(bad, seed=1)  # other bytes, so another manifest sha256
    victim = bad / "walker" / "walker-000001.npz"
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    with pytest.raises(SystemExit, match="corrupt"):
        retrieval.main(retrieval.BuildArgs(**{**build, "data_dir": str(bad), "overwrite": True}))
    # an episode without images (sha256 updated so that only the content is wrong)
    noimg = tmp_path / "noimg"
    make_dataset(noimg, per_embodiment=1)
    manifest = json.loads((noimg / "manifest.json").read_text())
    np.savez_compressed(noimg / manifest["episodes"][0]["path"], action=np.zeros((4, 1), np.float32))
    manifest["episodes"][0]["sha256"] = hashlib.sha256((noimg / manifest["episodes"][0]["path"]).read_bytes()).hexdigest()
    (noimg / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SystemExit, match="cannot read the first frame and actions .* KeyError"):
        retrieval.main(retrieval.BuildArgs(**{**build, "data_dir": str(noimg), "overwrite": True}))
    # a data directory whose manifest is not the one the index was built from
    with pytest.raises(SystemExit, match="not the manifest"):
        retrieval.main(retrieval.QueryArgs(index_dir=str(built / "index"), query_images=str(_save_query(tmp_path)),
                                           data_dir=str(bad)))
    assert {p.name: p.read_bytes() for p in (built / "index").iterdir()} == index_files


@pytest.mark.parametrize("value", [float("nan"), 1e38])
def test_bad_actions_in_an_episode_are_named(value, built, tmp_path):
    data = make_dataset(tmp_path / "data", per_embodiment=1)
    manifest = json.loads((data / "manifest.json").read_text())
    row = manifest["episodes"][-1]
    with np.load(data / row["path"]) as z:
        ep = dict(z)
    ep["action"][2, 0] = value
    np.savez_compressed(data / row["path"], **ep)
    row["sha256"] = hashlib.sha256((data / row["path"]).read_bytes()).hexdigest()
    (data / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "index"
    with pytest.raises(SystemExit, match=rf"episode .*{row['path']}: action\[2, 0\] = .* is not a finite number"):
        retrieval.main(retrieval.BuildArgs(out_dir=str(out), checkpoint=str(built / "wm.pt"), data_dir=str(data)))
    assert not out.exists()


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "odd model_config"])
def test_damaged_checkpoint_is_named(damage, built, tmp_path):
    raw, bad = (built / "wm.pt").read_bytes(), tmp_path / "wm.pt"
    if damage == "truncated":
        bad.write_bytes(raw[: len(raw) // 2])
    elif damage == "random bytes":
        bad.write_bytes(np.random.default_rng(0).bytes(len(raw)))
    else:
        ckpt = torch.load(built / "wm.pt", weights_only=True)
        ckpt["model_config"]["cnn_depth"] = 5  # weights of depth 4
        torch.save(ckpt, bad)
    out = tmp_path / "index"
    with pytest.raises(SystemExit, match=rf"{bad}.* \(.*\); re-run pretrain_wm.py to write it again"):
        retrieval.main(retrieval.BuildArgs(out_dir=str(out), checkpoint=str(bad), data_dir=str(built / "data")))
    assert not out.exists()


INDEX_DAMAGE = {
    "index.json not JSON": r"index.json is damaged: not valid JSON",
    "index.json rows not a list": r"index.json is damaged: missing or mistyped rows",
    "index.json row without action_dim": r"index.json is damaged: missing or mistyped rows\[3\].action_dim",
    "index.faiss random bytes": r"index.faiss is damaged: Faiss cannot read it",
    "index.faiss truncated": r"index.faiss is damaged: Faiss cannot read it",
}


@pytest.mark.parametrize("damage", INDEX_DAMAGE)
def test_damaged_index_files_are_named(damage, built, tmp_path):
    index = tmp_path / "index"
    shutil.copytree(built / "index", index)
    meta = json.loads((index / "index.json").read_text())
    if damage == "index.json not JSON":
        (index / "index.json").write_text('{"format_version": 1, "rows": [')
    elif damage == "index.json rows not a list":
        (index / "index.json").write_text(json.dumps({**meta, "rows": 5}))
    elif damage == "index.json row without action_dim":
        del meta["rows"][3]["action_dim"]
        (index / "index.json").write_text(json.dumps(meta))
    elif damage == "index.faiss random bytes":
        (index / "index.faiss").write_bytes(np.random.default_rng(0).bytes(300))
    else:
        (index / "index.faiss").write_bytes((built / "index" / "index.faiss").read_bytes()[:3000])
    rebuild = "; rebuild the index with `retrieval.py build --overwrite"
    with pytest.raises(SystemExit, match=f"{INDEX_DAMAGE[damage]}.*{rebuild}"):
        retrieval.main(retrieval.QueryArgs(index_dir=str(index), query_images=str(_save_query(tmp_path)), grid=0))
    assert not list(index.glob("query-*"))


def dead_pid() -> int:
    """The id of a process that has exited: a temporary file named with it is stale."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_full_disk_keeps_the_old_index_and_leaves_no_temporaries(built, tmp_path, monkeypatch):
    index = tmp_path / "index"
    shutil.copytree(built / "index", index)
    (index / f"index.faiss.tmp-{dead_pid()}").write_bytes(b"left by a killed run")
    before = {p.name: p.read_bytes() for p in index.iterdir() if ".tmp-" not in p.name}
    real_fsync = os.fsync

    def full_disk_for_the_index(fd):
        if "index.faiss.tmp-" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk_for_the_index)
    with pytest.raises(SystemExit, match=r"No space left on device while writing .*index.faiss; free some space"):
        retrieval.main(retrieval.BuildArgs(out_dir=str(index), checkpoint=str(built / "wm.pt"),
                                           data_dir=str(built / "data"), overwrite=True))
    assert {p.name: p.read_bytes() for p in index.iterdir()} == before  # the stale temporary swept too


def _save_query(root: Path) -> Path:
    np.save(root / "walker.npy", synthetic_frame("walker", np.random.default_rng(0))[None])
    return root / "walker.npy"


def _run(*argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_cli_refuses_other_checkpoint(built):
    other = make_checkpoint(built / "other.pt", seed=1)
    proc = _run("retrieval.py", "query", "--index-dir", str(built / "index"), "--task", "walker-walk",
                "--checkpoint", str(other))
    assert proc.returncode != 0
    assert "retrieval.py: error:" in proc.stderr and "sha256" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_query_with_task_renders_resets(built):
    proc = _run("retrieval.py", "query", "--index-dir", str(built / "index"), "--task", "walker-run-backwards",
                "--query-resets", "2", "--k", "3", "--grid", "3", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    assert "precision by embodiment (walker)" in proc.stdout
    assert (built / "index" / "query-walker-run-backwards.png").is_file()
    summary = json.loads((built / "index" / "query-walker-run-backwards.json").read_text())
    assert summary["action_dim"] == 6 and summary["num_query_frames"] == 2


def test_metaworld_reset_frames():
    # own process: after a Meta-World render, dm_control's frames in the same process can be garbage
    code = ("import numpy as np, retrieval; f = retrieval.render_reset_frames('mw-reach', 3, 0); "
            "assert f.shape == (3, 64, 64, 3) and f.dtype == np.uint8 and f.std() > 10, f.shape; "
            "assert (f[0] != f[1]).any() or (f[1] != f[2]).any(), 'same goal at every reset'; print('ok')")
    proc = _run("-c", code)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_every_flag_is_used():
    # Read from the code's structure: every field is read as `args.<field>` somewhere outside the Args classes.
    tree = ast.parse(inspect.getsource(retrieval))
    used = {node.attr for top in tree.body
            if not (isinstance(top, ast.ClassDef) and top.name in ("BuildArgs", "QueryArgs"))
            for node in ast.walk(top)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "args"}
    for cls in (retrieval.BuildArgs, retrieval.QueryArgs):
        unused = [f.name for f in dataclasses.fields(cls) if f.name not in used]
        assert not unused, f"{cls.__name__}: flags that do nothing: {unused}"


# ---------------------------------------------------------------------------------------------------------
# One retrieval path: retrieval.py query and fine-tuning render the same query for the same task and seed
# ---------------------------------------------------------------------------------------------------------

def test_query_rendering_is_finetune_gsa_copy():
    import finetune_gsa as ft
    for name in ("render_reset_frames",):
        assert inspect.getsource(getattr(ft, name)) == inspect.getsource(getattr(retrieval, name))
    for name in ("QUERY_SEED_OFFSET", "QUERY_CAMERA", "QUERY_STOCK_TASK", "TASK_NAMES", "STOCK_DMC_TASKS",
                 "DMC_DOMAIN_NAMES"):
        assert getattr(ft, name) == getattr(retrieval, name), name
    assert retrieval.QueryArgs().query_resets == ft.Args().query_resets
    assert retrieval.QueryArgs().seed == ft.Args().seed


@pytest.mark.parametrize("task", ["mw-drawer-open", "walker-run-backwards"])
def test_query_frames_are_seeded_and_match_finetuning_env_resets(task):
    # own processes (Meta-World and dm_control rendering must not share one). Two processes, same seed: the
    # same frames (Meta-World draws goals from numpy's unseeded global generator unless told otherwise); and
    # they are the first frames of fine-tuning's own env seeded alike.
    code = ("import hashlib, numpy as np, retrieval, finetune_gsa as ft; "
            f"f = retrieval.render_reset_frames('{task}', 2, 3); "
            f"env = ft.make_env('{task}', seed=3 + ft.QUERY_SEED_OFFSET); "
            "g = np.stack([env.reset() for _ in range(2)]); "
            "assert (f == g).all(), np.abs(f.astype(int) - g).max(); "
            "print(hashlib.sha256(f.tobytes()).hexdigest())")
    outs = [_run("-c", code) for _ in range(2)]
    assert all(p.returncode == 0 for p in outs), outs[0].stderr[-2000:]
    assert outs[0].stdout == outs[1].stdout
