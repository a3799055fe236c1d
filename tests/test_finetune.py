"""finetune_gsa.py: DreamerV3 pieces, guidance, rehearsal masking, parity with pretrain_wm.py, runs, errors.

Tiny sizes only (the whole file takes well under a minute of CPU). Upstream artefacts (wm.pt, offline data,
index) are built here in the contract formats from the scripts' own classes, so these tests do not depend on
the other stages' command-line programs (the end-to-end test chains those).
"""
import hashlib
import inspect
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch

import finetune_gsa as ft
from benchmark import finetune_batch
import pretrain_wm as pw

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)

# Short DMC runs: 20 agent steps per episode = 40 env frames.
RUN = dict(size="tiny", max_episode_steps=20, threads=1, k=5, video=False)


# ---------------------------------------------------------------------------------------------------------
# Upstream artefacts in the formats the stage scripts write and read
# ---------------------------------------------------------------------------------------------------------

def make_artifacts(root: Path, size: str = "tiny", T: int = 30):
    import faiss
    rng = np.random.default_rng(0)
    data, rows = root / "data", []
    for emb, adim, n in (("walker", 6, 3), ("cheetah", 6, 2), ("cartpole", 1, 2)):
        (data / emb).mkdir(parents=True)
        for i in range(n):
            image = rng.integers(0, 256, (T + 1, 64, 64, 3), dtype=np.uint8)
            action = rng.uniform(-1, 1, (T + 1, adim)).astype(np.float32)
            action[0] = 0
            buf = io.BytesIO()
            np.savez_compressed(buf, image=image, action=action, is_first=np.arange(T + 1) == 0)
            rel = f"{emb}/{emb}-{i:06d}.npz"
            (data / rel).write_bytes(buf.getvalue())
            rows.append({"path": rel, "embodiment": emb, "task": "walk" if emb == "walker" else None, "length": T,
                         "policy": "random", "noise_scale": None, "seed": i,
                         "sha256": hashlib.sha256(buf.getvalue()).hexdigest()})
    rows.sort(key=lambda r: r["path"])
    dims = {"cartpole": 1, "acrobot": 1, "walker": 6, "cheetah": 6, "quadruped": 12, "sawyer": 4}
    (data / "manifest.json").write_text(json.dumps({"format_version": 1, "image_size": 64, "action_repeat": 2,
                                                    "max_action_dim": 12, "action_dims": dims, "collection": {},
                                                    "episodes": rows}))
    manifest_sha = hashlib.sha256((data / "manifest.json").read_bytes()).hexdigest()
    torch.manual_seed(0)
    cfg = pw.ModelConfig(**{k: v for k, v in pw.SIZES[size].items() if k in pw.ModelConfig.__dataclass_fields__})
    wm = pw.WorldModel(cfg)
    (root / "pretrain").mkdir()
    ckpt_path = root / "pretrain" / "wm.pt"
    torch.save({"format_version": 1, "script": "pretrain_wm.py", "args": {"size": size},
                "model_config": asdict(cfg), "model": wm.state_dict(), "optimizer": {}, "step": 0, "rng": {},
                "embodiments": ["walker", "cheetah", "cartpole"], "manifest_sha256": manifest_sha}, ckpt_path)
    with torch.no_grad():
        first = np.stack([np.load(data / r["path"])["image"][0] for r in rows])
        feats = wm.encoder(torch.as_tensor(first)).numpy().astype(np.float32)
    index = faiss.IndexFlatL2(feats.shape[1])
    index.add(feats)
    (root / "index").mkdir()
    faiss.write_index(index, str(root / "index" / "index.faiss"))
    (root / "index" / "index.json").write_text(json.dumps({
        "format_version": 1, "metric": "l2", "index_type": "flat", "feature_dim": int(feats.shape[1]),
        "checkpoint_sha256": hashlib.sha256(ckpt_path.read_bytes()).hexdigest(), "manifest_sha256": manifest_sha,
        "rows": [{"path": r["path"], "embodiment": r["embodiment"], "task": r["task"],
                  "action_dim": dims[r["embodiment"]], "length": r["length"]} for r in rows]}))
    return dict(checkpoint=str(ckpt_path), index_dir=str(root / "index"), data_dir=str(data))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return make_artifacts(tmp_path_factory.mktemp("upstream"))


def run_main(**kw):
    ft.main(ft.Args(**{**RUN, **kw}))


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------
# DreamerV3 pieces
# ---------------------------------------------------------------------------------------------------------

def test_lambda_return_by_hand():
    # H = 2, gamma = 0.5, lambda = 0.5: R_1 = r_1 + g * v_2 = 2 + 0.5 * 20 = 12;
    # R_0 = r_0 + g * ((1 - l) * v_1 + l * R_1) = 1 + 0.5 * (5 + 6) = 6.5
    reward = torch.tensor([[1.0], [2.0]])
    value = torch.tensor([[0.0], [10.0], [20.0]])
    ret = ft.lambda_return(reward, value, discount=0.5, lam=0.5)
    assert torch.allclose(ret, torch.tensor([[6.5], [12.0]]))
    # lambda = 1: discounted sum of rewards plus the discounted final value
    assert torch.allclose(ft.lambda_return(reward, value, 0.5, 1.0)[0], torch.tensor([1 + 0.5 * 2 + 0.25 * 20]))


def test_return_normalisation_percentile_ema_and_floor():
    norm = ft.ReturnNorm()
    ret = torch.arange(101.0)  # 5th percentile 5, 95th 95
    norm.update(ret)
    assert math.isclose(norm.low.item(), 0.01 * 5, rel_tol=1e-5)
    assert math.isclose(norm.high.item(), 0.01 * 95, rel_tol=1e-5)
    assert norm.scale().item() == 1.0  # 0.9 < floor 1
    norm.update(ret)
    assert math.isclose(norm.high.item() - norm.low.item(), 90 * (1 - 0.99**2), rel_tol=1e-5)
    for _ in range(2000):
        norm.update(ret)
    assert math.isclose(norm.scale().item(), 90.0, rel_tol=1e-3)


def test_twohot_round_trip_and_symlog():
    x = torch.tensor([-1e6, -123.4, -1.0, -1e-3, 0.0, 1e-3, 0.5, 7.0, 1e4])
    assert torch.allclose(ft.symexp(ft.symlog(x)), x, rtol=1e-5)
    bins = ft.twohot_bins()
    assert len(bins) == 255 and bins[0] == -20 and bins[-1] == 20
    enc = ft.twohot_encode(ft.symlog(x), bins)
    assert torch.allclose(enc.sum(-1), torch.ones(len(x))) and ((enc > 0).sum(-1) <= 2).all()
    decoded = ft.symexp((enc * bins).sum(-1))
    assert torch.allclose(decoded, x, rtol=1e-4, atol=1e-5)
    # logits that put all mass on the two-hot weights decode to the same value
    assert torch.allclose(ft.twohot_mean(torch.log(enc.clamp(min=1e-30)), bins), x, rtol=1e-3, atol=1e-4)
    assert torch.equal(ft.twohot_encode(bins[7:8], bins)[0].nonzero().flatten(), torch.tensor([7]))


# ---------------------------------------------------------------------------------------------------------
# Execution guidance
# ---------------------------------------------------------------------------------------------------------

def test_guidance_schedule_scaled_to_the_budget():
    dmc = ft.guidance_schedule(ft.Args(guidance_schedule="scaled", env_steps=50_000), is_metaworld=False)
    mw = ft.guidance_schedule(ft.Args(guidance_schedule="scaled", env_steps=60_000), is_metaworld=True)
    assert dmc == (1.0, 0.0, 16_666) and mw == (1.0, 0.0, 40_000)
    assert ft.guidance_probability(25_000, *mw) == 0.375 and ft.guidance_probability(50_000, *mw) == 0.0


def test_guidance_schedule_values():
    dmc = ft.guidance_schedule(ft.Args(), is_metaworld=False)
    mw = ft.guidance_schedule(ft.Args(), is_metaworld=True)
    rel = ft.guidance_schedule(ft.Args(guidance_schedule="release"), is_metaworld=False)
    assert dmc == (1.0, 0.0, 50_000) and mw == (1.0, 0.0, 150_000) and rel == (1.0, 0.1, 200_000)
    p = lambda f, s: ft.guidance_probability(f, *s)  # noqa: E731
    assert p(0, dmc) == 1.0 and p(25_000, dmc) == 0.5 and p(50_000, dmc) == 0.0 and p(10**6, dmc) == 0.0
    assert p(75_000, mw) == 0.5 and math.isclose(p(100_000, rel), 0.55) and math.isclose(p(10**6, rel), 0.1)
    over = ft.guidance_schedule(ft.Args(guidance_start=0.5, guidance_end=0.2, guidance_frames=10), False)
    assert over == (0.5, 0.2, 10)


@pytest.mark.parametrize("length", [500, 100])
def test_guidance_window_units(length):
    rng = np.random.default_rng(0)
    unit = length // 10
    seen = set()
    for _ in range(2000):
        first, steps = ft.guidance_window(length, rng, "window")
        assert steps % unit == 0 and unit <= steps <= length and 0 <= first <= length - steps
        seen.add(steps)
        first, steps = ft.guidance_window(length, rng, "jsrl")
        assert first == 0 and steps % unit == 0 and unit <= steps <= length
    assert seen == {unit * m for m in range(1, 11)}


# ---------------------------------------------------------------------------------------------------------
# Rehearsal: the reward loss sees online rows only
# ---------------------------------------------------------------------------------------------------------

def tiny_agent(action_dim=6, seed=0, precision="auto"):
    torch.manual_seed(seed)
    p = ft.AGENT_SIZES["tiny"]
    agent = ft.Agent(ft.model_config_for("tiny"), action_dim, units=p["units"], layers=p["layers"],
                     horizon=p["horizon"], precision=precision)
    return agent


def test_reward_loss_ignores_offline_rows():
    agent = tiny_agent()
    torch.nn.init.normal_(agent.reward.out.weight)  # zero-initialised heads predict the same for every target
    batch = finetune_batch(4, 6, 6, online_rows=3)
    results = []
    for offline_reward in (0.0, 1e3):
        b = dict(batch, reward=batch["reward"].clone())
        b["reward"][3] = offline_reward  # the rehearsal row
        torch.manual_seed(1)
        agent.zero_grad(set_to_none=True)
        _, reward_loss, _, _ = agent.world_model_loss(b)
        reward_loss.backward()
        results.append((reward_loss.detach(), [p.grad.clone() for p in agent.reward.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
    # ... while an online row's reward does change it
    b = dict(batch, reward=batch["reward"].clone())
    b["reward"][0] = 1e3
    torch.manual_seed(1)
    assert not torch.equal(agent.world_model_loss(b)[1].detach(), results[0][0])


def test_update_runs_and_rejects_non_finite_loss():
    agent = tiny_agent()
    m = agent.update(finetune_batch(4, 6, 6, online_rows=3))
    for key in ("wm_loss", "reward_loss", "actor_loss", "critic_loss", "entropy", "return_scale"):
        assert math.isfinite(m[key])
    with torch.no_grad():
        agent.reward.out.bias[0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        agent.update(finetune_batch(4, 6, 6, online_rows=3))


def test_bf16_update_is_close_to_fp32_and_heads_stay_fp32():
    batch = finetune_batch(4, 6, 6, online_rows=3)
    metrics = {}
    for precision in ("fp32", "bf16"):  # same initial weights, batch and sampling noise
        agent = tiny_agent(precision=precision)
        with agent.autocast():
            assert agent.critic(torch.randn(3, agent.critic.body[0].in_features)).dtype == torch.float32
        torch.manual_seed(3)
        metrics[precision] = agent.update(batch)
    for key in ("wm_loss", "reward_loss", "critic_loss"):
        a, b = metrics["fp32"][key], metrics["bf16"][key]
        assert math.isfinite(b) and abs(a - b) <= 0.02 * abs(a), (key, a, b)


def test_auto_precision_is_bf16_on_gpus_and_on_cpus_with_bf16_units(monkeypatch):
    for has_units in (False, True):
        monkeypatch.setattr(ft, "cpu_has_bf16_units", lambda: has_units)
        assert isinstance(tiny_agent().autocast(), torch.autocast) == has_units
        assert ft.uses_bf16("auto", "cpu") == has_units
        assert ft.uses_bf16("auto", "cuda") and ft.uses_bf16("bf16", "cpu")
        assert not ft.uses_bf16("fp32", "cuda") and not isinstance(tiny_agent(precision="fp32").autocast(),
                                                                  torch.autocast)


def test_padded_action_dims_stay_zero():
    agent = tiny_agent(action_dim=1)
    action, _ = agent.act(None, torch.zeros(12), np.zeros((64, 64, 3), np.uint8), mode=False)
    assert action.shape == (12,) and (action[1:] == 0).all()


# ---------------------------------------------------------------------------------------------------------
# Parity with pretrain_wm.py (the shared classes are verbatim copies)
# ---------------------------------------------------------------------------------------------------------

SHARED = ("ModelConfig", "_trunc_normal_init", "compile_step", "BlockLinear", "ChannelNorm", "Encoder", "Decoder", "RSSM",
          "WorldModel")


@pytest.mark.parametrize("name", SHARED)
def test_shared_class_source_identical(name):
    assert inspect.getsource(getattr(ft, name)) == inspect.getsource(getattr(pw, name))


def test_sizes_world_model_part_identical():
    model_fields = set(pw.ModelConfig.__dataclass_fields__)
    assert ft.SIZES == {size: {k: v for k, v in d.items() if k in model_fields} for size, d in pw.SIZES.items()}
    assert set(ft.AGENT_SIZES) == set(pw.SIZES)


def test_strict_load_and_identical_outputs():
    cfg = pw.ModelConfig(**{k: v for k, v in pw.SIZES["tiny"].items() if k in pw.ModelConfig.__dataclass_fields__})
    torch.manual_seed(0)
    src = pw.WorldModel(cfg)
    dst = ft.WorldModel(ft.ModelConfig(**asdict(cfg)))
    dst.load_state_dict(src.state_dict(), strict=True)
    batch = finetune_batch(2, 5, 6)
    outs = []
    for model in (src, dst):
        torch.manual_seed(3)
        loss, metrics, post = model.loss(batch["image"], batch["action"], batch["is_first"])
        outs.append((loss, post["deter"], model.encoder(batch["image"])))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_retrieve_is_retrieval_py_copy():
    retrieval = pytest.importorskip("retrieval")
    assert inspect.getsource(ft.retrieve) == inspect.getsource(retrieval.retrieve)


# ---------------------------------------------------------------------------------------------------------
# Whole runs (tiny) and clear errors
# ---------------------------------------------------------------------------------------------------------

def test_no_pretrain_dmc_run_writes_metrics(tmp_path):
    out = tmp_path / "run"
    run_main(task="cartpole-balance", no_pretrain=True, env_steps=80, out_dir=str(out), video=True)
    lines = read_jsonl(out / "metrics.jsonl")
    assert [line["env_steps"] for line in lines] == [80]
    for key in ("env_steps", "eval_return", "wall_time", "train_updates", "guidance_p"):
        assert key in lines[0]
    assert lines[0]["guidance_p"] == 0.0 and lines[0]["train_updates"] > 0
    assert (out / "train.jsonl").is_file() and list((out / "videos").glob("*.mp4"))
    assert len(list((out / "replay").glob("ep-*.npz"))) == 2
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["counters"]["env_frames"] == 80 and ckpt["bc_prior"] is None


def test_metaworld_run_reports_success(tmp_path, artifacts):
    out = tmp_path / "mw"
    run_main(task="mw-reach", no_rehearsal=True, no_guidance=True, checkpoint=artifacts["checkpoint"],
             index_dir="/nonexistent", data_dir="/nonexistent", env_steps=40, max_episode_steps=10,
             out_dir=str(out))
    (line,) = read_jsonl(out / "metrics.jsonl")
    assert line["env_steps"] == 40 and 0.0 <= line["eval_success"] <= line["eval_success_any"] <= 1.0
    episodes = read_jsonl(out / "episodes.jsonl")
    assert len(episodes) == 2 and all(e["prior_steps"] == 0 and "success_any" in e for e in episodes)


def test_gsa_run_retrieves_and_guides(tmp_path, artifacts):
    out = tmp_path / "gsa"
    run_main(task="walker-walk", env_steps=120, out_dir=str(out), guidance_frames=120, **artifacts)
    info = json.loads((out / "retrieval.json").read_text())
    assert set(info["by_embodiment"]) <= {"walker", "cheetah"} and len(info["episodes"]) == 5  # action dim 6
    assert info["mixed_embodiments"] == (len(info["by_embodiment"]) > 1)  # 3 walker + 2 cheetah episodes here
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["bc_prior"] is not None and ckpt["counters"]["env_frames"] == 120
    first = np.load(out / "replay" / "ep-000000.npz")
    assert first["action"].shape == (21, 12) and (first["action"][:, 6:] == 0).all()
    episodes = read_jsonl(out / "episodes.jsonl")
    assert [e["episode"] for e in episodes] == list(range(len(list((out / "replay").glob("ep-*.npz")))))
    assert episodes[0]["warmup"] and episodes[0]["prior_steps"] == episodes[0]["length"] == 20  # pi_bc warm-up
    assert episodes[0]["return"] == pytest.approx(float(first["reward"].sum()), abs=1e-4)
    for e in episodes:
        assert 0 <= e["prior_first"] and e["prior_first"] + e["prior_steps"] <= e["length"]


def test_checkpoint_round_trip_gives_identical_update(tmp_path):
    agent = tiny_agent()
    batch = finetune_batch(4, 6, 6, online_rows=3)
    agent.update(batch)
    torch.manual_seed(7)
    rng = np.random.default_rng(5)
    path = tmp_path / "ckpt.pt"
    ft.save_checkpoint(path, agent, None, False, {"env_frames": 1}, rng, ft.Args(), {})
    ckpt = torch.load(path, weights_only=True)
    clone = tiny_agent(seed=123)
    clone.wm.load_state_dict(ckpt["model"])
    for name in ("reward", "actor", "critic", "slow_critic", "return_norm"):
        getattr(clone, name).load_state_dict(ckpt[name])
    for name, opt in clone.optimizers().items():
        opt.load_state_dict(ckpt["optimizers"][name])
    torch.set_rng_state(ckpt["rng"]["torch"])
    rng2 = np.random.default_rng(0)
    ft.set_rng_state(ckpt["rng"], rng2)
    assert rng2.random() == rng.random()
    m1 = agent.update(batch)
    torch.set_rng_state(ckpt["rng"]["torch"])  # the torch RNG state saved with the checkpoint, for both
    m2 = clone.update(batch)
    for key in ("wm_loss", "reward_loss", "actor_loss", "critic_loss"):
        assert m1[key] == m2[key], key


def test_resume_after_kill_reaches_same_counters(tmp_path, artifacts):
    full, killed = tmp_path / "full", tmp_path / "killed"
    common = dict(task="walker-walk", env_steps=160, guidance_frames=160, checkpoint_every=40, **artifacts)
    run_main(out_dir=str(full), **common)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**RUN, **common}.items() if not isinstance(v, bool)]
    proc = subprocess.Popen([sys.executable, str(ROOT / "finetune_gsa.py"), "--out-dir", str(killed),
                             "--no-video", *flags], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (killed / "replay" / "ep-000002.npz").exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with pytest.raises(SystemExit, match="--resume"):  # refuses to reuse the directory without --resume
        run_main(out_dir=str(killed), **common)
    run_main(out_dir=str(killed), resume=True, **common)
    a = torch.load(full / "ckpt.pt", weights_only=True)["counters"]
    b = torch.load(killed / "ckpt.pt", weights_only=True)["counters"]
    for key in ("env_frames", "agent_steps", "episodes", "updates", "evals"):
        assert a[key] == b[key], key
    steps = lambda d: [line["env_steps"] for line in read_jsonl(d / "metrics.jsonl")]  # noqa: E731
    assert steps(full) == steps(killed) == [80, 160]
    assert len(list((killed / "replay").glob("ep-*.npz"))) == 4
    episodes = lambda d: [(e["episode"], e["env_steps"]) for e in read_jsonl(d / "episodes.jsonl")]  # noqa: E731
    assert episodes(full) == episodes(killed) == [(0, 40), (1, 80), (2, 120), (3, 160)]


def test_unknown_task_errors(tmp_path):
    out = tmp_path / "x"
    with pytest.raises(SystemExit, match="unknown task 'walker-fly'.*walker-run"):
        run_main(task="walker-fly", no_pretrain=True, out_dir=str(out))
    assert not out.exists()
    res = subprocess.run([sys.executable, str(ROOT / "finetune_gsa.py"), "--task", "walker-fly", "--no-pretrain",
                          "--out-dir", str(out)], capture_output=True, text=True)
    assert res.returncode != 0 and "unknown task" in res.stderr and not out.exists()


def test_missing_index_errors(tmp_path, artifacts):
    out = tmp_path / "x"
    with pytest.raises(SystemExit, match="no retrieval index"):
        run_main(task="walker-walk", out_dir=str(out), **{**artifacts, "index_dir": str(tmp_path / "none")})
    assert not out.exists()


def test_index_of_other_checkpoint_errors(tmp_path, artifacts):
    other = tmp_path / "other.pt"
    ckpt = torch.load(artifacts["checkpoint"], weights_only=True)
    ckpt["step"] = 1
    torch.save(ckpt, other)
    with pytest.raises(SystemExit, match="another encoder"):
        run_main(task="walker-walk", out_dir=str(tmp_path / "x"), **{**artifacts, "checkpoint": str(other)})


def test_checkpoint_of_other_size_errors(tmp_path, artifacts):
    out = tmp_path / "x"
    with pytest.raises(SystemExit, match="another size"):
        run_main(task="walker-walk", size="xs", out_dir=str(out), **artifacts)
    assert not out.exists()
    bad = tmp_path / "v2.pt"
    ckpt = torch.load(artifacts["checkpoint"], weights_only=True)
    ckpt["format_version"] = 2
    torch.save(ckpt, bad)
    with pytest.raises(SystemExit, match="format version"):
        run_main(task="walker-walk", out_dir=str(out), **{**artifacts, "checkpoint": str(bad)})


def test_corrupt_retrieved_episode_errors(tmp_path, artifacts):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(artifacts["data_dir"], data)
    path = data / "walker" / "walker-000001.npz"
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF
    path.write_bytes(bytes(raw))
    out = tmp_path / "x"
    with pytest.raises(SystemExit, match="corrupt"):
        run_main(task="walker-walk", out_dir=str(out), **{**artifacts, "data_dir": str(data)})
    assert not out.exists()


def test_every_flag_is_used():
    # Read from the code's structure: every Args field is read as `args.<field>` somewhere outside Args itself.
    import ast
    from dataclasses import fields

    tree = ast.parse(inspect.getsource(ft))
    used = {node.attr for top in tree.body if not (isinstance(top, ast.ClassDef) and top.name == "Args")
            for node in ast.walk(top)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "args"}
    used |= set(ft.PRESET_FLAGS)  # read as getattr(args, name) where the size preset is resolved ...
    assert all(set(ft.PRESET_FLAGS) <= set(preset) for preset in ft.AGENT_SIZES.values())  # ... into these
    unused = [f.name for f in fields(ft.Args) if f.name not in used]
    assert not unused, f"flags that do nothing: {unused}"
