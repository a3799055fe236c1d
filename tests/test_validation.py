"""Bad flags fail before anything is written, naming the flag: every int/float field of every Args class of
collect_offline.py, pretrain_wm.py and retrieval.py has a stated range (ARG_RANGES), and for each bound a value
just outside it stops main() before --out-dir exists. Generated from the dataclasses, so a new numeric flag
without a range fails here. The settings every stage shares read the same in all four scripts. Fast: nothing real
runs."""
import ast
import dataclasses
import inspect
import math
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import collect_offline
import pretrain_wm
import retrieval

ROOT = Path(__file__).resolve().parents[1]


def make_collect(root: Path):
    return collect_offline.Args(out_dir=str(root / "out"), num_workers=1), [root / "out"]


def make_pretrain(root: Path):
    return pretrain_wm.Args(out_dir=str(root / "out"), data_dir=str(root / "data"), size="tiny"), [root / "out"]


def make_build(root: Path):
    args = retrieval.BuildArgs(out_dir=str(root / "out"), checkpoint=str(root / "wm.pt"), data_dir=str(root / "data"))
    return args, [root / "out"]


def make_query(root: Path):
    args = retrieval.QueryArgs(index_dir=str(root / "index"), task="walker-walk", out=str(root / "out" / "q.png"))
    return args, [root / "out", root / "index"]


SCRIPTS = {"collect_offline": (collect_offline, collect_offline.Args, make_collect),
           "pretrain_wm": (pretrain_wm, pretrain_wm.Args, make_pretrain),
           "retrieval build": (retrieval, retrieval.BuildArgs, make_build),
           "retrieval query": (retrieval, retrieval.QueryArgs, make_query)}


def numeric_fields(cls) -> dict:
    """{field name: int or float} for the int, float, Optional[int] and Optional[float] fields of `cls`."""
    found = {}
    for name, hint in typing.get_type_hints(cls).items():
        if typing.get_origin(hint) is typing.Union:
            inner = [a for a in typing.get_args(hint) if a is not type(None)]
            hint = inner[0] if len(inner) == 1 else hint
        if hint in (int, float):
            found[name] = hint
    return found


def outside(bound, kind, direction):
    """The nearest value of the field's type beyond `bound` (direction -1: below, +1: above)."""
    return bound + direction if kind is int else math.nextafter(bound, direction * math.inf)


# (script, field, "low" or "high") for every stated bound; a field without an entry fails the test below.
CASES = [(script, name, side) for script, (module, cls, _) in SCRIPTS.items() for name in numeric_fields(cls)
         for side, bound in zip(("low", "high"), module.ARG_RANGES.get(name, (None, None))) if bound is not None]


def test_every_numeric_flag_has_a_range_and_every_range_a_flag():
    for script, (module, cls, _) in SCRIPTS.items():
        missing = set(numeric_fields(cls)) - set(module.ARG_RANGES)
        assert not missing, f"{script}: no ARG_RANGES entry for {sorted(missing)}"
    for module in (collect_offline, pretrain_wm, retrieval):
        classes = [cls for _, (m, cls, _) in SCRIPTS.items() if m is module]
        stale = set(module.ARG_RANGES) - {n for cls in classes for n in numeric_fields(cls)}
        assert not stale, f"{module.__name__}: ARG_RANGES names no numeric flag: {sorted(stale)}"


def test_defaults_are_in_range():
    for _, (module, cls, _) in SCRIPTS.items():
        module.check_ranges(cls())


@pytest.mark.parametrize("script, name, side", CASES)
def test_just_outside_each_bound_fails_before_writing(script, name, side, tmp_path):
    module, cls, make = SCRIPTS[script]
    kind = numeric_fields(cls)[name]
    low, high = module.ARG_RANGES[name]
    bound = low if side == "low" else high
    args, outputs = make(tmp_path)
    module.check_ranges(dataclasses.replace(args, **{name: kind(bound)}))  # the bound itself is valid
    bad = outside(kind(bound), kind, -1 if side == "low" else 1)
    flag = "--" + name.replace("_", "-")
    with pytest.raises(SystemExit, match=f"{module.SCRIPT}: error: {flag} must be .*, got {re.escape(str(bad))}$"):
        module.main(dataclasses.replace(args, **{name: bad}))
    assert not any(p.exists() for p in outputs)


@pytest.mark.parametrize("script", SCRIPTS)
def test_non_finite_floats_fail_before_writing(script, tmp_path):
    module, cls, make = SCRIPTS[script]
    floats = [n for n, kind in numeric_fields(cls).items() if kind is float]
    args, outputs = make(tmp_path)
    for name in floats:
        for value in (math.nan, math.inf, -math.inf):
            flag = "--" + name.replace("_", "-")
            with pytest.raises(SystemExit, match=f"{flag} must be a finite number"):
                module.main(dataclasses.replace(args, **{name: value}))
    assert not any(p.exists() for p in outputs)


@pytest.mark.parametrize("script", SCRIPTS)
def test_out_dir_that_is_a_file_is_refused(script, tmp_path):
    module, _, make = SCRIPTS[script]
    args, outputs = make(tmp_path)
    outputs[0].write_text("not a directory")
    with pytest.raises(SystemExit, match=f"{outputs[0]} is not a directory"):
        module.main(args)
    assert outputs[0].read_text() == "not a directory"


@pytest.mark.parametrize("script, argv", [
    ("collect_offline.py", ["--num-workers", "0"]),
    ("pretrain_wm.py", ["--grad-clip", "-1"]),
    ("retrieval.py", ["build", "--batch-size", "0"]),
])
def test_command_line_names_the_flag_without_a_traceback(script, argv, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / script), *argv, "--out-dir", str(out)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1 and f"{script}: error: {argv[-2]} must be >= " in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def field_help(cls) -> dict:
    """{field name: the docstring under it} of a dataclass, read from its source as tyro reads it."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {stmt.target.id: after.value.value for stmt, after in zip(body, body[1:])
            if isinstance(stmt, ast.AnnAssign) and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)}


def test_shared_settings_read_the_same_in_every_script():
    import finetune_gsa

    classes = [collect_offline.Args, pretrain_wm.Args, retrieval.BuildArgs, retrieval.QueryArgs, finetune_gsa.Args]
    for name in ("seed", "device", "threads", "precision", "resume"):
        having = [cls for cls in classes if name in typing.get_type_hints(cls)]
        hints = {f"{cls.__module__}.{cls.__name__}": typing.get_type_hints(cls)[name] for cls in having}
        assert len(set(hints.values())) == 1, f"--{name} has different types: {hints}"
        if name == "device":  # the same choices, so the same help (--precision auto differs: see its help)
            helps = {f"{cls.__module__}.{cls.__name__}": field_help(cls)[name] for cls in having}
            assert len(set(helps.values())) == 1, f"--{name} has different help texts: {helps}"
    seeds = {f"{cls.__module__}.{cls.__name__}": cls().seed for cls in classes}
    assert set(seeds.values()) == {0}, f"default seeds differ: {seeds}"
