"""Tests of pretrain_wm.py: RSSM pieces, the data pool, training, resume, DDP, bad inputs. Tiny and fast."""
import ast
import errno
import hashlib
import inspect
import json
import math
import os
import re
import signal
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch

import pretrain_wm as P

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------------------
# A tiny dataset in the exact collect_offline.py format: a square moved by the actions (learnable)
# ---------------------------------------------------------------------------------------------------------
def make_dataset(root: Path, episodes: int = 2, length: int = 20, embodiments=P.EMBODIMENTS, seed: int = 0):
    rng = np.random.default_rng(seed)
    rows = []
    for e_i, emb in enumerate(embodiments):
        (root / emb).mkdir(parents=True, exist_ok=True)
        adim = P.ACTION_DIMS[emb]
        for k in range(episodes):
            action = np.zeros((length + 1, adim), np.float32)
            action[1:] = np.clip(rng.normal(0, 0.6, (length, adim)), -1, 1)
            image = np.empty((length + 1, 64, 64, 3), np.uint8)
            image[:] = (40 * e_i, 80, 200 - 30 * e_i)  # embodiment-specific background
            pos = rng.uniform(10, 50, 2)
            for t in range(length + 1):
                if t > 0:
                    pos = np.clip(pos + 4 * action[t, [0, -1]], 4, 56)
                y, x = int(pos[0]), int(pos[1])
                image[t, y - 4 : y + 4, x - 4 : x + 4] = (255, 255, 0)
            is_first = np.zeros(length + 1, bool)
            is_first[0] = True
            rel = f"{emb}/{emb}-{k:06d}.npz"
            np.savez_compressed(root / rel, image=image, action=action, is_first=is_first)
            rows.append({"path": rel, "embodiment": emb, "task": None, "length": length, "policy": "synthetic",
                         "noise_scale": None, "seed": seed,
                         "sha256": hashlib.sha256((root / rel).read_bytes()).hexdigest()})
    manifest = {"format_version": 1, "image_size": 64, "action_repeat": 2, "max_action_dim": 12,
                "action_dims": dict(P.ACTION_DIMS), "collection": {"synthetic": True},
                "episodes": sorted(rows, key=lambda r: r["path"])}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


def run(data, out, **kw):
    """main() in-process with tiny settings; returns the metrics.jsonl training lines."""
    base = dict(data_dir=str(data), out_dir=str(out), size="tiny", steps=10, threads=1, log_every=1,
                checkpoint_every=5, eval_every=1000, pool_mb=2, holdout_fraction=0.2)
    P.main(P.Args(**{**base, **kw}))
    lines = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if "loss" in x]


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return P.WorldModel(P.size_config("tiny"))


# ---------------------------------------------------------------------------------------------------------
# RSSM pieces
# ---------------------------------------------------------------------------------------------------------
def test_unimix_floor_and_normalised():
    rssm = tiny_model().rssm
    logits = rssm._logits(torch.tensor([[50.0, -50.0, 0.0, 0.0] * rssm.cfg.stoch]))
    probs = logits.exp()
    C = rssm.cfg.classes
    assert torch.all(probs >= 0.01 / C - 1e-7)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, rssm.cfg.stoch))


def test_straight_through_sample():
    torch.manual_seed(0)
    raw = torch.randn(3, 4, 5, requires_grad=True)
    logits = torch.log_softmax(raw, -1)
    sample = P.RSSM.sample(logits)
    onehot = torch.nn.functional.one_hot(sample.argmax(-1), 5).float()
    torch.testing.assert_close(sample, onehot, atol=1e-6, rtol=0)  # forward: one-hot (up to rounding)
    (sample * torch.randn(3, 4, 5)).sum().backward()
    assert raw.grad is not None and raw.grad.abs().sum() > 0  # backward: gradient reaches the logits


def test_kl_balance_free_bits_by_hand():
    q = torch.tensor([0.7, 0.2, 0.1])
    p = torch.tensor([0.2, 0.3, 0.5])
    kl_qp = float((q * (q / p).log()).sum())  # one latent
    # 2 latents with the same pair -> KL summed over latents = 2 * kl_qp
    post = {"logits": q.log().repeat(1, 1, 2, 1).requires_grad_()}
    prior = {"logits": p.log().repeat(1, 1, 2, 1).requires_grad_()}
    for free in (0.0, 1.0, 5.0):
        loss, dyn, rep = P.RSSM.kl_loss(post, prior, free=free, dyn_scale=1.0, rep_scale=0.1)
        expect = 1.0 * max(free, 2 * kl_qp) + 0.1 * max(free, 2 * kl_qp)
        assert abs(loss.item() - expect) < 1e-5 and abs(dyn.item() - 2 * kl_qp) < 1e-5
    # balancing: the dynamics term trains only the prior, the representation term only the posterior
    _, dyn, rep = P.RSSM.kl_loss(post, prior, free=0.0)
    g_prior = torch.autograd.grad(dyn.sum(), [prior["logits"]], retain_graph=True)[0]
    assert g_prior.abs().sum() > 0
    assert torch.autograd.grad(dyn.sum(), [post["logits"]], allow_unused=True)[0] is None
    assert torch.autograd.grad(rep.sum(), [prior["logits"]], allow_unused=True)[0] is None
    # below the free bits both terms are constants: no gradient at all
    loss, _, _ = P.RSSM.kl_loss(post, prior, free=5.0)
    g = torch.autograd.grad(loss.sum(), [post["logits"], prior["logits"]])
    assert all(float(x.abs().sum()) == 0 for x in g)


def test_observe_matches_obs_step_and_shapes():
    wm = tiny_model()
    cfg = wm.cfg
    B, T = 2, 3
    image = torch.randint(0, 256, (B, T, 64, 64, 3), dtype=torch.uint8)
    action = torch.rand(B, T, 12) * 2 - 1
    is_first = torch.zeros(B, T, dtype=torch.bool)
    is_first[:, 0] = True
    embed = wm.encoder(image)
    assert embed.shape == (B, T, wm.encoder.out_dim) == (B, T, 8 * cfg.cnn_depth * 16)
    post, prior = wm.rssm.observe(embed, action, is_first)
    assert post["deter"].shape == (B, T, cfg.deter) and post["stoch"].shape == (B, T, cfg.stoch, cfg.classes)
    p0, q0 = wm.rssm.obs_step(wm.rssm.initial(B), action[:, 0], embed[:, 0], is_first[:, 0])
    torch.testing.assert_close(p0["logits"], post["logits"][:, 0])
    torch.testing.assert_close(q0["logits"], prior["logits"][:, 0])
    recon = wm.decoder(wm.rssm.get_feat(post))
    assert recon.shape == (B, T, 64, 64, 3)
    states = wm.rssm.imagine(lambda f: torch.zeros(f.shape[0], 12), {k: v[:, -1] for k, v in post.items()}, 4)
    assert states["deter"].shape == (5, B, cfg.deter)


def test_paper_size_parameter_count_on_meta():
    with torch.device("meta"):
        wm = P.WorldModel(P.size_config("paper"))
    n = sum(p.numel() for p in wm.parameters())
    assert abs(n - 280e6) / 280e6 < 0.10, n
    s = P.SIZES["s"]
    assert (s["deter"], s["hidden"], s["cnn_depth"], s["stoch"], s["classes"], s["batch_size"], s["seq_len"]) == \
        (512, 512, 32, 32, 32, 16, 64)


def test_every_arg_is_used():
    # Read from the code's structure: every Args field is read as `args.<field>` somewhere outside Args itself.
    tree = ast.parse(inspect.getsource(P))
    used = {node.attr for top in tree.body if not (isinstance(top, ast.ClassDef) and top.name == "Args")
            for node in ast.walk(top)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "args"}
    unused = [f.name for f in fields(P.Args) if f.name not in used]
    assert not unused, f"flags that do nothing: {unused}"


@pytest.mark.parametrize("spec", ["gpu", "cuda:x"])
def test_a_device_that_is_not_one_is_named(spec, data, tmp_path):
    with pytest.raises(SystemExit, match=f"--device '{spec}' is not a torch device"):
        run(data, tmp_path / "out", device=spec)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------
def test_pool_is_bounded_refreshed_and_deterministic(data):
    _, _, rows, embs = P.load_manifest(data, None)
    assert embs == list(P.EMBODIMENTS)

    def draw(seed):
        pool = P.EpisodePool(data, rows, 8, pool_mb=1.5, swaps_per_step=1.0, rng=np.random.default_rng(seed))
        pool.fill()
        assert pool.slots < len(rows)
        seen, firsts = set(), []
        for step in range(30):
            pool.refresh(step)
            seen.update(pool.slot_ids)
            b = pool.sample(3)
            firsts.append(b["image"][:, 0].copy())
            assert b["image"].shape == (3, 8, 64, 64, 3) and b["action"].shape == (3, 8, 12)
            assert b["is_first"][:, 0].all()
        pool.close()
        return seen, np.stack(firsts)

    seen, a = draw(0)
    _, b = draw(0)
    assert len(seen) > 4  # episodes rotate through the pool
    np.testing.assert_array_equal(a, b)  # the background prefetch does not change what is sampled


def test_embodiment_parsing_and_holdout(data):
    assert P.parse_embodiments("dmc") == list(P.EMBODIMENTS[:5])
    assert P.parse_embodiments("sawyer,walker") == ["walker", "sawyer"]
    with pytest.raises(SystemExit, match="unknown embodiment"):
        P.parse_embodiments("walker,ant")
    _, _, rows, _ = P.load_manifest(data, ["walker", "sawyer"])
    train, held = P.split_holdout(rows, ["walker", "sawyer"], 0.2)
    assert all(len(v) == 1 for v in held.values()) and len(train) == 2
    assert P.split_holdout(rows, ["walker", "sawyer"], 0.2)[1] == held  # deterministic


# ---------------------------------------------------------------------------------------------------------
# Training runs
# ---------------------------------------------------------------------------------------------------------
def test_tiny_run_learns_and_writes_outputs(data, tmp_path):
    out = tmp_path / "run"
    lines = run(data, out, steps=40, log_every=10, eval_every=40, checkpoint_every=20, pool_swaps_per_step=0.5,
                lr=1e-3)
    assert lines[-1]["loss"] < 0.8 * lines[0]["loss"], (lines[0]["loss"], lines[-1]["loss"])
    ckpt = torch.load(out / "wm.pt", weights_only=True)
    assert ckpt["format_version"] == P.CHECKPOINT_FORMAT_VERSION and ckpt["script"] == "pretrain_wm.py"
    assert ckpt["step"] == 40
    assert ckpt["embodiments"] == list(P.EMBODIMENTS)
    assert ckpt["manifest_sha256"] == hashlib.sha256((data / "manifest.json").read_bytes()).hexdigest()
    wm = P.WorldModel(P.ModelConfig(**ckpt["model_config"]))
    wm.load_state_dict(ckpt["model"], strict=True)
    assert json.loads((out / "args.json").read_text())["size"] == "tiny"
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "openloop_mse" in x]
    assert set(evals[-1]) == {"step"} | {f"openloop{kind}_mse/{e}" for e in P.EMBODIMENTS for kind in ("", "_copy")}
    assert len(list((out / "videos").glob("openloop-walker-*.gif"))) == 1
    assert list((out / "tb").iterdir())
    # a second run into the same directory without --resume refuses and leaves the checkpoint alone
    before = (out / "wm.pt").read_bytes()
    with pytest.raises(SystemExit, match="exists; pass --resume"):
        run(data, out)
    assert (out / "wm.pt").read_bytes() == before


def test_bf16_on_cpu_runs_and_learns(data, tmp_path):
    lines = run(data, tmp_path / "run", steps=30, log_every=10, eval_every=30, lr=1e-3, precision="bf16")
    assert all(math.isfinite(x["loss"]) for x in lines)
    assert lines[-1]["loss"] < 0.8 * lines[0]["loss"], (lines[0]["loss"], lines[-1]["loss"])


def test_resume_gives_the_same_losses(data, tmp_path):
    kw = dict(checkpoint_every=5, eval_every=7, pool_mb=1.5, pool_swaps_per_step=0.5)
    full = run(data, tmp_path / "a", steps=16, **kw)
    run(data, tmp_path / "b", steps=8, **kw)  # ends with a checkpoint at 8 (and an eval at 7 in between)
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "loss": 123.0}\n{"step": 10, "lo')  # lines of a killed run after the checkpoint
    resumed = run(data, tmp_path / "b", steps=16, resume=True, **kw)
    assert [x["step"] for x in resumed] == list(range(1, 17))
    for x, y in zip(full, resumed):
        for k in ("loss", "recon_loss", "kl_dyn", "kl_rep", "grad_norm"):
            assert abs(x[k] - y[k]) <= 1e-6 * max(1.0, abs(x[k])), (x["step"], k, x[k], y[k])
    with pytest.raises(SystemExit, match="run-defining args differ: --seed"):
        run(data, tmp_path / "b", steps=20, resume=True, seed=1, **kw)


def test_non_finite_loss_stops_and_keeps_checkpoint(data, tmp_path, monkeypatch):
    real, calls = P.train_step, []

    def poisoned(*a, **k):
        calls.append(1)
        m = real(*a, **k)
        if len(calls) == 7:
            m = {**m, "loss": torch.tensor(float("nan")), "nonfinite": "loss"}
        return m

    monkeypatch.setattr(P, "train_step", poisoned)
    with pytest.raises(SystemExit, match=r"non-finite loss at update 7 .*; the checkpoint .*wm.pt of update 5 is kept"):
        run(data, tmp_path / "r", steps=10, checkpoint_every=5)
    assert torch.load(tmp_path / "r" / "wm.pt", weights_only=True)["step"] == 5


def test_non_finite_gradient_with_finite_loss_stops_before_the_step(data, tmp_path, monkeypatch):
    real = P.WorldModel.loss

    def poisoned(self, *a, **k):  # a finite loss whose gradient is NaN
        loss, metrics, post = real(self, *a, **k)
        loss.register_hook(lambda g: g * float("nan"))
        return loss, metrics, post

    cfg = P.size_config("tiny")
    wm = P.WorldModel(cfg)
    opt = torch.optim.Adam(wm.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in wm.parameters()]
    rng = np.random.default_rng(0)
    batch = {"image": torch.as_tensor(rng.integers(0, 256, (2, 8, 64, 64, 3), dtype=np.uint8)),
             "action": torch.zeros(2, 8, 12), "is_first": torch.zeros(2, 8, dtype=torch.bool)}
    monkeypatch.setattr(P.WorldModel, "loss", poisoned)
    m = P.train_step(wm, opt, batch, P.Args(size="tiny"))
    assert m["nonfinite"] == "gradient" and math.isfinite(float(m["loss"]))
    assert all(torch.equal(a, b) for a, b in zip(before, wm.parameters()))
    with pytest.raises(SystemExit, match="non-finite gradient at update 1 .*no checkpoint was written yet"):
        run(data, tmp_path / "g", steps=3)
    assert not (tmp_path / "g" / "wm.pt").exists()


def test_sampling_is_uniform_over_time_steps(tmp_path):
    # One 20-step and one 100-step episode, windows of 8: 13 and 93 valid starts, so the long episode must
    # supply 93 / 106 = 88% of the windows (uniform over episodes would give 50%).
    d = make_dataset(tmp_path / "short", episodes=1, length=20, embodiments=("walker",))
    make_dataset(tmp_path / "long", episodes=1, length=100, embodiments=("walker",))
    (d / "walker" / "walker-000001.npz").write_bytes((tmp_path / "long" / "walker" / "walker-000000.npz").read_bytes())
    rows = [{"path": "walker/walker-000000.npz", "length": 20}, {"path": "walker/walker-000001.npz", "length": 100}]
    for r in rows:
        r.update(embodiment="walker", sha256=hashlib.sha256((d / r["path"]).read_bytes()).hexdigest())
    pool = P.EpisodePool(d, rows, 8, pool_mb=64, swaps_per_step=0.0, rng=np.random.default_rng(0))
    pool.fill()
    for slot, ep_id in enumerate(pool.slot_ids):
        pool.episodes[slot]["image"][:] = ep_id  # tag every frame with its episode
    share_long = np.mean([(pool.sample(500)["image"][:, 0, 0, 0, 0] == 1).mean() for _ in range(4)])
    assert abs(share_long - 93 / 106) < 0.04, share_long


# ---------------------------------------------------------------------------------------------------------
# Bad inputs: clear error, nothing written
# ---------------------------------------------------------------------------------------------------------
def test_corrupt_or_missing_episode_or_changed_manifest(tmp_path):
    d = make_dataset(tmp_path / "d", episodes=1, length=10, embodiments=("walker", "sawyer"))
    out = tmp_path / "out"
    ep = d / "walker" / "walker-000000.npz"
    good = ep.read_bytes()
    ep.write_bytes(good[:-20] + b"x" * 20)
    with pytest.raises(SystemExit, match="corrupt: sha256"):
        run(d, out, seq_len=8)
    ep.unlink()
    with pytest.raises(SystemExit, match="missing"):
        run(d, out, seq_len=8)
    assert not out.exists()
    ep.write_bytes(good)
    with pytest.raises(SystemExit, match="no episodes for embodiment"):
        run(d, out, embodiments="cheetah")
    (d / "manifest.json").write_text(json.dumps({**json.loads((d / "manifest.json").read_text()),
                                                 "format_version": 99}))
    with pytest.raises(SystemExit, match="format_version"):
        run(d, out, seq_len=8)
    assert not out.exists()
    # resume against a changed manifest refuses and changes nothing
    d2 = make_dataset(tmp_path / "d2", episodes=2, length=10, embodiments=("walker",))
    run(d2, out, steps=2, seq_len=8, holdout_fraction=0.0)
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    m = json.loads((d2 / "manifest.json").read_text())
    m["collection"] = {"changed": True}
    (d2 / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(SystemExit, match="differs from the one"):
        run(d2, out, steps=4, seq_len=8, holdout_fraction=0.0, resume=True)
    assert snapshot == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}


@pytest.mark.parametrize("value", [float("nan"), 1e38, -1.01])
def test_bad_actions_in_an_episode_are_named_before_anything_is_written(value, tmp_path):
    d = make_dataset(tmp_path / "d", episodes=1, length=10, embodiments=("walker",))
    rel = "walker/walker-000000.npz"
    with np.load(d / rel) as z:
        ep = dict(z)
    ep["action"][4, 2] = value
    np.savez_compressed(d / rel, **ep)
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["episodes"][0]["sha256"] = hashlib.sha256((d / rel).read_bytes()).hexdigest()
    (d / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=rf"episode {re.escape(str(d / rel))}: action\[4, 2\] = .* is not a finite "
                                         r"number in \[-1, 1\]"):
        run(d, out, seq_len=8)
    assert not out.exists()


def test_actions_within_rounding_of_the_bounds_are_accepted(tmp_path):
    d = make_dataset(tmp_path / "d", episodes=1, length=10, embodiments=("walker",))
    P.check_actions(d, np.array([[1.0 + 5e-7, -1.0 - 5e-7]], np.float32))


@pytest.fixture
def finished(data, tmp_path):
    """A finished 4-update run, checkpoint and final evaluation at update 4."""
    out = tmp_path / "done"
    run(data, out, steps=4, checkpoint_every=4, eval_every=4)
    return out


def snapshot(out: Path) -> dict:
    return {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "tb" not in p.parts}


def test_resuming_a_finished_run_adds_nothing(data, finished):
    before = snapshot(finished)
    run(data, finished, steps=4, checkpoint_every=4, eval_every=4, resume=True)
    after = snapshot(finished)
    args_json = finished / "args.json"
    assert {p: b for p, b in after.items() if p != args_json} == {p: b for p, b in before.items() if p != args_json}
    evals = [x for x in (finished / "metrics.jsonl").read_text().splitlines() if "openloop_mse" in x]
    assert len(evals) == 1


def test_a_bad_metrics_line_before_the_last_is_named(data, finished):
    lines = (finished / "metrics.jsonl").read_text().splitlines()
    lines.insert(1, "not json")
    (finished / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit, match=r"metrics.jsonl line 2 is not a metrics row; delete that line"):
        run(data, finished, steps=6, checkpoint_every=4, eval_every=4, resume=True)


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "no step", "wrong weights", "bad pool"])
def test_damaged_checkpoint_is_named_on_resume(damage, data, finished):
    ckpt_path = finished / "wm.pt"
    raw = ckpt_path.read_bytes()
    if damage == "truncated":
        ckpt_path.write_bytes(raw[: len(raw) // 2])
    elif damage == "random bytes":
        ckpt_path.write_bytes(np.random.default_rng(0).bytes(len(raw)))
    else:
        ckpt = torch.load(ckpt_path, weights_only=True)
        if damage == "no step":
            del ckpt["step"]
        elif damage == "wrong weights":
            key = next(iter(ckpt["model"]))
            ckpt["model"][key] = torch.zeros(3)
        else:
            ckpt["rng"]["ranks"][0]["pool"]["slot_ids"] = [10**6]
        torch.save(ckpt, ckpt_path)
    before = snapshot(finished)
    with pytest.raises(SystemExit, match=r"checkpoint .*wm.pt is damaged \(.*\); delete it to start this run over"):
        run(data, finished, steps=6, checkpoint_every=4, eval_every=4, resume=True)
    assert snapshot(finished) == before


def test_a_checkpoint_of_another_format_version_is_refused_on_resume(data, finished):
    ckpt = torch.load(finished / "wm.pt", weights_only=True)
    ckpt["format_version"] = P.CHECKPOINT_FORMAT_VERSION + 1
    torch.save(ckpt, finished / "wm.pt")
    before = snapshot(finished)
    with pytest.raises(SystemExit, match=rf"wm.pt has format version {P.CHECKPOINT_FORMAT_VERSION + 1}, and this "
                                         rf"script resumes only version {P.CHECKPOINT_FORMAT_VERSION}"):
        run(data, finished, steps=6, checkpoint_every=4, eval_every=4, resume=True)
    assert snapshot(finished) == before


def test_a_checkpoint_with_the_old_rng_encoding_is_refused_on_resume(data, finished):
    ckpt = torch.load(finished / "wm.pt", weights_only=True)
    ckpt["rng"]["ranks"][0]["numpy"] = {"key": torch.zeros(624, dtype=torch.int64), "pos": 0}  # before JSON
    torch.save(ckpt, finished / "wm.pt")
    before = snapshot(finished)
    with pytest.raises(SystemExit, match="older encoding, so this run cannot continue exactly"):
        run(data, finished, steps=6, checkpoint_every=4, eval_every=4, resume=True)
    assert snapshot(finished) == before


def dead_pid() -> int:
    """The id of a process that has exited: a temporary file named with it is stale."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_full_disk_names_the_file_and_leaves_no_temporaries(data, finished, monkeypatch):
    stale = [finished / f"wm.pt.tmp-{dead_pid()}", finished / "videos" / f"x.gif.tmp-{dead_pid()}"]
    for path in stale:
        path.write_bytes(b"left by a killed run")
    real_fsync = os.fsync

    def full_disk_for_checkpoints(fd):
        if "wm.pt.tmp-" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk_for_checkpoints)
    before = (finished / "wm.pt").read_bytes()
    with pytest.raises(SystemExit, match=r"No space left on device while writing .*wm.pt; free some space"):
        run(data, finished, steps=6, checkpoint_every=4, eval_every=4, resume=True)
    assert not [p for p in finished.rglob("*") if ".tmp-" in p.name]
    assert (finished / "wm.pt").read_bytes() == before


# ---------------------------------------------------------------------------------------------------------
# Data-parallel
# ---------------------------------------------------------------------------------------------------------
def test_two_process_gloo_run(data, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "pretrain_wm.py"), "--data-dir", str(data), "--out-dir", str(out), "--size", "tiny",
           "--steps", "4", "--threads", "1", "--log-every", "2", "--checkpoint-every", "2", "--device", "cpu"]
    # Own process group, killed whole on a timeout, so no rank outlives a hung run.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"2-process run timed out:\n{stdout[-2000:]}\n{stderr[-2000:]}")
    res = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = torch.load(out / "wm.pt", weights_only=True)
    assert ckpt["step"] == 4 and len(ckpt["rng"]["ranks"]) == 2
    assert "x 2 process(es)" in res.stdout
