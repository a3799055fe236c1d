"""finetune_gsa.py --init-from: task adaptation (paper Sec. 4.2), one task starting from an earlier task's run.

What carries over (world model, actor) and what starts fresh (reward head, critics, return scale, optimisers);
the earlier runs' online episodes as retrieval candidates; refusals before anything is written. Tiny sizes, on
the upstream artefacts of tests/test_finetune.py (walker, cheetah and cartpole offline episodes).
"""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import finetune_gsa as ft
from test_finetune import RUN, make_artifacts, read_jsonl, run_main

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return make_artifacts(tmp_path_factory.mktemp("upstream"))


@pytest.fixture(scope="module")
def stand(tmp_path_factory, artifacts):
    """A finished walker-stand run (2 episodes of 20 agent steps): the earlier task."""
    out = tmp_path_factory.mktemp("runs") / "stand"
    run_main(task="walker-stand", env_steps=80, guidance_frames=80, out_dir=str(out), **artifacts)
    return out


def digest(folder: Path) -> dict:
    """sha256 of every file under a folder: what a refused run must leave as it was."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_init_from_keeps_world_model_and_actor_and_resets_the_heads(tmp_path, artifacts, stand):
    earlier = torch.load(stand / "ckpt.pt", weights_only=True)
    agents = {}
    for name, extra in (("adapted", {"init_from": str(stand)}), ("fresh", {})):
        args = ft.Args(**{**RUN, "task": "walker-walk", "out_dir": str(tmp_path / name), **artifacts, **extra})
        setup = ft.prepare(args)
        torch.manual_seed(args.seed)  # as main seeds it before building the agent
        agents[name] = ft.build_agent(args, setup, 6)
        assert not (tmp_path / name).exists()  # prepare and build_agent write nothing
    adapted, fresh = agents["adapted"], agents["fresh"]
    for key, value in earlier["model"].items():
        assert torch.equal(adapted.wm.state_dict()[key], value), key
    for key, value in earlier["actor"].items():
        assert torch.equal(adapted.actor.state_dict()[key], value), key
    # The heads are those of a run without --init-from (same seed): fresh, not the earlier task's.
    for head in ("reward", "critic", "slow_critic", "return_norm"):
        mine, new = getattr(adapted, head).state_dict(), getattr(fresh, head).state_dict()
        assert all(torch.equal(mine[k], new[k]) for k in new), head
    assert not all(torch.equal(adapted.critic.state_dict()[k], v) for k, v in earlier["critic"].items())
    assert not all(torch.equal(adapted.reward.state_dict()[k], v) for k, v in earlier["reward"].items())
    assert all(not opt.state for opt in adapted.optimizers().values())  # no Adam moments carried over
    # ... and the world model really differs from the pre-trained one it fine-tuned
    pre = torch.load(artifacts["checkpoint"], weights_only=True)["model"]
    assert any(not torch.equal(fresh.wm.state_dict()[k], adapted.wm.state_dict()[k]) for k in pre)


def test_earlier_episodes_are_retrieved_rehearsed_reward_free_and_chained(tmp_path, artifacts, stand):
    index_before = digest(Path(artifacts["index_dir"]))
    data_before = digest(Path(artifacts["data_dir"]))
    stand_before = digest(stand)
    walk = tmp_path / "walk"
    # k covers every 6-dim candidate: 3 walker + 2 cheetah offline episodes and stand's 2 online ones.
    common = dict(task="walker-walk", init_from=str(stand), guidance_frames=80, k=50, **artifacts)
    run_main(env_steps=80, out_dir=str(walk), **common)
    info = json.loads((walk / "retrieval.json").read_text())
    assert info["by_source"] == {"offline": 5, "online/walker-stand": 2}
    online = [e for e in info["episodes"] if e["source"] == "online/walker-stand"]
    assert sorted(e["path"] for e in online) == sorted(str(ft.replay_path(stand.resolve(), i)) for i in range(2))
    ckpt = torch.load(walk / "ckpt.pt", weights_only=True)
    assert ckpt["experience"] == [{"run": str(stand.resolve()), "task": "walker-stand", "episodes": 2}]
    assert ckpt["wm_sha256"] == hashlib.sha256(Path(artifacts["checkpoint"]).read_bytes()).hexdigest()
    # Rehearsal reads them without their rewards, actions cut back to the task's dims (then padded again).
    row = ckpt["retrieved_online"][0]
    episode = ft.load_offline_episode(Path(artifacts["data_dir"]), row, row["sha256"], 12)
    assert not episode["reward"].any() and episode["action"].shape == (21, 12) and not episode["action"][:, 6:].any()
    # Nothing upstream changed: the index files, the offline data and the earlier run.
    assert digest(Path(artifacts["index_dir"])) == index_before and digest(Path(artifacts["data_dir"])) == data_before
    assert digest(stand) == stand_before
    # --resume continues with the same --init-from (the earlier episodes of D_r are reloaded) ...
    run_main(env_steps=120, out_dir=str(walk), resume=True, **common)
    assert [line["env_steps"] for line in read_jsonl(walk / "metrics.jsonl")] == [80, 120]
    # ... and refuses another one, before writing anything.
    before = digest(walk)
    with pytest.raises(SystemExit, match="init_from"):
        run_main(env_steps=160, out_dir=str(walk), resume=True, **{**common, "init_from": str(tmp_path)})
    assert digest(walk) == before
    # A third task sees both earlier tasks' episodes.
    run3 = tmp_path / "run"
    run_main(task="walker-run", init_from=str(walk), env_steps=40, guidance_frames=40, k=50, out_dir=str(run3),
             **artifacts)
    info = json.loads((run3 / "retrieval.json").read_text())
    assert info["by_source"] == {"offline": 5, "online/walker-stand": 2, "online/walker-walk": 3}
    assert [r["task"] for r in torch.load(run3 / "ckpt.pt", weights_only=True)["experience"]] == \
        ["walker-stand", "walker-walk"]


@pytest.mark.parametrize("task, pattern", [
    ("cheetah-run", r"walker-stand \(walker, 6 action dims\) but cheetah-run is a cheetah task"),
    ("cartpole-balance", r"walker-stand \(walker, 6 action dims\) but cartpole-balance is a cartpole task \(1"),
])
def test_refuses_a_run_of_another_embodiment(tmp_path, artifacts, stand, task, pattern):
    before = digest(stand)
    out = tmp_path / "x"
    with pytest.raises(SystemExit, match=pattern):
        run_main(task=task, init_from=str(stand), out_dir=str(out), **artifacts)
    assert not out.exists() and digest(stand) == before


def tampered(tmp_path: Path, stand: Path, **changes) -> Path:
    """A copy of the earlier run's directory with its checkpoint changed."""
    run = tmp_path / "tampered"
    (run / "replay").mkdir(parents=True)
    for p in (stand / "replay").glob("*.npz"):
        (run / "replay" / p.name).write_bytes(p.read_bytes())
    ckpt = torch.load(stand / "ckpt.pt", weights_only=True)
    for key, value in changes.items():
        if callable(value):
            value(ckpt)
        else:
            ckpt[key] = value
    torch.save(ckpt, run / "ckpt.pt")
    return run


def _deeper(ckpt):
    ckpt["model_config"] = {**ckpt["model_config"], "deter": ckpt["model_config"]["deter"] * 2}


def _scratch(ckpt):
    ckpt["args"] = {**ckpt["args"], "no_pretrain": True}


@pytest.mark.parametrize("case, pattern", [
    ("missing dir", "no such run directory"),
    ("no ckpt", "holds no ckpt.pt"),
    ("corrupt ckpt", "is damaged or not a checkpoint"),
    ("pretrain ckpt", "is not a finetune_gsa.py checkpoint"),
    ("other size", "a run of size 'xs', this run is of size 'tiny'"),
    ("other config", "another configuration.*deter: earlier run"),
    ("other pre-training", "another pre-trained checkpoint"),
    ("from scratch", "learned from scratch"),
    ("lost episode", "ep-000001.npz is missing"),
    ("with no-pretrain", "fine-tuned a pre-trained world model, but --no-pretrain"),
    ("packnet from a plain run", "that run did not use --packnet"),
    ("packnet before pruning", "stopped before its pruning point"),
])
def test_bad_input_is_named_and_writes_nothing(tmp_path, artifacts, stand, case, pattern):
    out, kw = tmp_path / "out", {}
    if case == "missing dir":
        init = tmp_path / "nowhere"
    elif case == "no ckpt":
        init = tmp_path / "empty"
        init.mkdir()
    elif case == "corrupt ckpt":
        init = tmp_path / "corrupt"
        init.mkdir()
        (init / "ckpt.pt").write_bytes((stand / "ckpt.pt").read_bytes()[:5000])
    elif case == "pretrain ckpt":
        init = tmp_path / "pre"
        init.mkdir()
        (init / "ckpt.pt").write_bytes(Path(artifacts["checkpoint"]).read_bytes())
    elif case == "other size":
        init = tampered(tmp_path, stand, size="xs")
    elif case == "other config":
        init = tampered(tmp_path, stand, model_config=_deeper)
    elif case == "other pre-training":
        init = tampered(tmp_path, stand, wm_sha256="0" * 64)
    elif case == "from scratch":
        init = tampered(tmp_path, stand, args=_scratch)
    elif case == "lost episode":
        init = tampered(tmp_path, stand)
        (init / "replay" / "ep-000001.npz").unlink()
    elif case == "packnet from a plain run":
        init, kw = stand, {"packnet": True}
    elif case == "packnet before pruning":
        init = tampered(tmp_path, stand, packnet={"task": 1, "keep": 0.5, "pruned": False, "owner": {}})
        kw = {"packnet": True}
    else:
        init, kw = stand, {"no_pretrain": True}
    before = digest(init) if init.exists() else None
    out_before = digest(out) if out.exists() else None
    with pytest.raises(SystemExit, match=pattern):
        run_main(task="walker-walk", init_from=str(init), out_dir=str(out), **{**artifacts, **kw})
    assert (digest(out) if out.exists() else None) == out_before
    assert (digest(init) if init.exists() else None) == before


def test_command_line_refusal_exits_non_zero(tmp_path, artifacts):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**RUN, **artifacts}.items() if not isinstance(v, bool)]
    res = subprocess.run([sys.executable, str(ROOT / "finetune_gsa.py"), "--task", "walker-walk", "--init-from",
                          str(empty), "--out-dir", str(out), *flags], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode != 0 and "holds no ckpt.pt" in res.stderr and not out.exists()


# ---------------------------------------------------------------------------------------------------------
# PackNet (--packnet), the paper's adaptation baseline
# ---------------------------------------------------------------------------------------------------------

def test_packnet_prune_keeps_the_largest_weights_and_later_tasks_leave_them_alone():
    torch.manual_seed(0)
    actor = ft.Actor(8, 3, units=16, layers=1)
    first = ft.PackNet(actor, task=1, keep=0.25)
    assert set(first.owner) == {"net.body.0.weight", "net.out.weight"}  # linear weights only
    before = {k: v.detach().clone() for k, v in actor.named_parameters()}
    counts = first.prune()
    for name, owner in first.owner.items():
        w, kept = before[name].abs(), owner == 1
        assert int(kept.sum()) == round(0.25 * w.numel()) == counts[name][0]
        assert w[kept].min() >= w[~kept].max()  # by magnitude
        after = dict(actor.named_parameters())[name]
        assert torch.equal(after[kept], before[name][kept]) and not after[~kept].any()  # the rest zeroed, free

    second = ft.PackNet(actor, task=2, keep=0.5, owner=first.state()["owner"])
    opt = torch.optim.Adam(actor.parameters(), lr=0.1)
    snapshot = {k: v.detach().clone() for k, v in actor.named_parameters()}
    for _ in range(3):  # Adam's momentum would keep moving masked weights without restore()
        opt.zero_grad()
        sum(out.square().sum() for out in actor(torch.randn(5, 8))).backward()  # mean and std
        second.mask_grads()
        opt.step()
        second.restore()
    for name, p in actor.named_parameters():
        if name in second.owner:
            old = second.owner[name] == 1
            assert torch.equal(p[old], snapshot[name][old])  # task 1's weights are untouched
            assert (p[~old] != 0).all()  # the free ones learned task 2
        else:
            assert torch.equal(p, snapshot[name])  # norms and biases: fixed after the first task
    free_before = {n: int((o == 0).sum()) for n, o in second.owner.items()}
    second.prune()
    for name, owner in second.owner.items():
        assert int((owner == 2).sum()) == round(0.5 * free_before[name])
        assert int((owner == 1).sum()) == int((first.owner[name] == 1).sum())


def test_packnet_sequence_from_scratch_keeps_the_earlier_tasks_weights(tmp_path, artifacts):
    """--no-pretrain --packnet, then --init-from it: the second task changes only weights the first left free."""
    flags = dict(no_pretrain=True, packnet=True, env_steps=120, **artifacts)
    first, second = tmp_path / "stand", tmp_path / "walk"
    run_main(task="walker-stand", out_dir=str(first), packnet_keep=0.5, packnet_prune_at=0.5, **flags)
    one = torch.load(first / "ckpt.pt", weights_only=True)
    assert one["packnet"]["pruned"] and one["packnet"]["task"] == 1
    for name, owner in one["packnet"]["owner"].items():  # the pruned weights stayed 0 while the rest retrained
        assert int((owner == 1).sum()) == round(0.5 * owner.numel()) and not one["actor"][name][owner == 0].any()
    run_main(task="walker-stand", out_dir=str(first), packnet_keep=0.5, packnet_prune_at=0.5, resume=True,
             **{**flags, "env_steps": 160})  # resumed after pruning: the masks come back from ckpt.pt
    more = torch.load(first / "ckpt.pt", weights_only=True)
    assert more["counters"]["updates"] > one["counters"]["updates"]
    for name, owner in one["packnet"]["owner"].items():
        assert torch.equal(more["packnet"]["owner"][name], owner) and not more["actor"][name][owner == 0].any()
    one = more
    run_main(task="walker-walk", out_dir=str(second), init_from=str(first), packnet_keep=1.0, **flags)
    two = torch.load(second / "ckpt.pt", weights_only=True)
    assert two["packnet"]["task"] == 2 and two["packnet"]["pruned"]
    assert two["counters"]["updates"] > 0
    changed = 0
    for name, value in two["actor"].items():
        if name in one["packnet"]["owner"]:
            owner = one["packnet"]["owner"][name]
            assert torch.equal(value[owner == 1], one["actor"][name][owner == 1]), name
            assert torch.equal(two["packnet"]["owner"][name][owner == 1], owner[owner == 1])
            assert (two["packnet"]["owner"][name][owner == 0] == 2).all()  # keep 1.0: all the rest is task 2's
            changed += int((value[owner == 0] != 0).sum())
        else:
            assert torch.equal(value, one["actor"][name]), name
    assert changed > 0
    assert not all(torch.equal(two["critic"][k], v) for k, v in one["critic"].items())  # the critic is fresh
    assert json.loads((second / "args.json").read_text())["init_from"] == str(first)
    assert ft.variant_name(ft.Args(task="walker-walk", no_pretrain=True, packnet=True)) == "no-pretrain-packnet"
