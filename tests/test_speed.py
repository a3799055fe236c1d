"""Speed changes keep the update's computation: the code as it is against the code before them (issue 12).

How: REFERENCE names a commit whose update is the one these changes must reproduce. Its finetune_gsa.py and
pretrain_wm.py are read with `git show` and imported as separate modules beside the current ones, and both run
on the same fixed batch from the same seed on this machine, so the comparison does not depend on a CPU's or a
library's rounding, only on the two code paths. Checked, at `tiny` and at `xs` widths on a small batch:
  - fine-tuning: the four losses of the first update, then every parameter and buffer after 10 updates;
  - pre-training: the loss of the first world-model update, then every parameter after 10 updates.
The tolerance is float rounding (the present changes are bit-exact; a fused kernel may change the last bits).

Learner changes are not speed changes: the reference Agent runs the current `behavior_loss` (the returns,
bootstrap and losses that learner issues tune), and both agents get the same explicit hyperparameters. A change
meant to alter anything else the update computes moves REFERENCE to its own commit. Skipped where git or the
commit is not available (an exported tree, a shallow clone).
"""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import finetune_gsa as ft
import pretrain_wm as pw
from benchmark import finetune_batch

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = "b2cc3e9fd316c8a9a93838759b6ae8e1f9d18e82"  # before the speed changes of issue 12
SIZES = {"tiny": dict(batch_size=4, seq_len=8, horizon=4, units=32, layers=1),
         "xs": dict(batch_size=4, seq_len=8, horizon=4, units=256, layers=2)}  # xs widths, a small batch
AGENT = dict(discount=0.99, return_lambda=0.95, entropy_scale=1e-4, wm_lr=1e-4, actor_lr=8e-5, critic_lr=8e-5,
             kl=(1.0, 0.1, 1.0), precision="fp32")
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The REFERENCE commit's two stage scripts as modules ref_finetune_gsa and ref_pretrain_wm."""
    folder = tmp_path_factory.mktemp("reference")
    modules = {}
    for name in ("pretrain_wm", "finetune_gsa"):
        try:
            res = subprocess.run(["git", "show", f"{REFERENCE}:{name}.py"], cwd=ROOT, capture_output=True)
        except FileNotFoundError:
            pytest.skip("git is not installed")
        if res.returncode != 0:
            pytest.skip(f"commit {REFERENCE[:7]} is not in this checkout's history")
        path = folder / f"ref_{name}.py"
        path.write_bytes(res.stdout)
        spec = importlib.util.spec_from_file_location(f"ref_{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up here
        spec.loader.exec_module(module)
        modules[name] = module
    return modules


def make_agent(agent_class, module, size: str):
    torch.manual_seed(0)
    s = SIZES[size]
    return agent_class(module.model_config_for(size), 6, units=s["units"], layers=s["layers"], horizon=s["horizon"],
                       **AGENT)


def run_updates(agent, size: str, n: int = 10):
    s = SIZES[size]
    batch = finetune_batch(s["batch_size"], s["seq_len"], 6, online_rows=s["batch_size"] - 1, seed=1)
    torch.manual_seed(1)
    first = agent.update(batch)
    for _ in range(n - 1):
        agent.update(batch)
    return first, agent.state_dict()


def assert_states_close(got: dict, want: dict):
    assert list(got) == list(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=RTOL, atol=ATOL, msg=key)


@pytest.mark.parametrize("size", ["tiny", "xs"])
def test_finetune_update_matches_reference(reference, size):
    ref = reference["finetune_gsa"]

    class ReferenceAgent(ref.Agent):
        behavior_loss = ft.Agent.behavior_loss  # learner issues' part: taken from the current code
        critic_bootstrap = "slow"  # read by the current behavior_loss; the reference commit had only this one

    old_first, old_state = run_updates(make_agent(ReferenceAgent, ref, size), size)
    new_first, new_state = run_updates(make_agent(ft.Agent, ft, size), size)
    for name in ("wm_loss", "reward_loss", "actor_loss", "critic_loss"):
        assert new_first[name] == pytest.approx(old_first[name], rel=RTOL, abs=ATOL), name
    assert_states_close(new_state, old_state)


@pytest.mark.parametrize("size", ["tiny", "xs"])
def test_pretrain_update_matches_reference(reference, size):
    ref = reference["pretrain_wm"]
    states, firsts = [], []
    for module in (ref, pw):
        torch.manual_seed(0)
        wm = module.WorldModel(module.size_config(size))
        opt = torch.optim.Adam(wm.parameters(), lr=1e-4, eps=1e-5, weight_decay=1e-6)
        args = module.Args(out_dir="-", data_dir="-", size=size)
        s = SIZES[size]
        batch = finetune_batch(s["batch_size"], s["seq_len"], 6, seed=2)
        batch = {k: batch[k] for k in ("image", "action", "is_first")}
        torch.manual_seed(1)
        firsts.append(float(module.train_step(wm, opt, batch, args)["loss"]))
        for _ in range(9):
            module.train_step(wm, opt, batch, args)
        states.append(wm.state_dict())
    assert firsts[1] == pytest.approx(firsts[0], rel=RTOL, abs=ATOL)
    assert_states_close(states[1], states[0])


# ---------------------------------------------------------------------------------------------------------
# --compile: the loops' steps compiled (torch.compile), the same computation
# ---------------------------------------------------------------------------------------------------------

def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def test_compiled_loops_compute_the_same_update():
    """Agent.compile_loops (finetune_gsa.py --compile) and pretrain_wm.py's compiled filtering step: the first
    update's losses and every parameter after 3 updates match eager mode to float rounding (random ops run
    torch's own kernels, so the latent and action samples are the same ones)."""
    eager_first, eager_state = run_updates(make_agent(ft.Agent, ft, "tiny"), "tiny", n=3)
    before = compiled_graphs()
    agent = make_agent(ft.Agent, ft, "tiny")
    agent.compile_loops()
    first, state = run_updates(agent, "tiny", n=3)
    assert compiled_graphs() >= before + 2, "the two loop steps were not compiled"
    for name in ("wm_loss", "reward_loss", "actor_loss", "critic_loss"):
        assert first[name] == pytest.approx(eager_first[name], rel=RTOL, abs=ATOL), name
    assert_states_close(state, eager_state)

    losses, states = [], []
    for compiled in (False, True):
        torch.manual_seed(0)
        wm = pw.WorldModel(pw.size_config("tiny"))
        if compiled:
            wm.rssm.filter_step = pw.compile_step(wm.rssm.filter_step, "cpu")
        opt = torch.optim.Adam(wm.parameters(), lr=1e-4, eps=1e-5, weight_decay=1e-6)
        batch = finetune_batch(4, 8, 6, seed=2)
        torch.manual_seed(1)
        losses.append([float(pw.train_step(wm, opt, {k: batch[k] for k in ("image", "action", "is_first")},
                                           pw.Args(out_dir="-", data_dir="-", size="tiny"))["loss"])
                       for _ in range(3)])
        states.append(wm.state_dict())
    assert losses[1] == pytest.approx(losses[0], rel=RTOL, abs=ATOL)
    assert_states_close(states[1], states[0])


def test_compile_without_a_working_compiler_falls_back_to_eager(monkeypatch):
    """A CPU without a usable C++ compiler: the compiled step fails to build, runs eagerly instead (a warning, no
    crash) and computes what eager mode computes."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/c++",))
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)  # a cached kernel would need no compiler
    torch._dynamo.reset()
    try:
        eager_first, eager_state = run_updates(make_agent(ft.Agent, ft, "tiny"), "tiny", n=2)
        agent = make_agent(ft.Agent, ft, "tiny")
        agent.compile_loops()
        first, state = run_updates(agent, "tiny", n=2)
    finally:
        torch._dynamo.reset()
    for name in ("wm_loss", "reward_loss", "actor_loss", "critic_loss"):
        assert first[name] == pytest.approx(eager_first[name], rel=RTOL, abs=ATOL), name
    assert_states_close(state, eager_state)
