"""Study files: validation that names every bad field (exit 2, nothing left behind), expansion into
cells with stable ids, FLOP-matched budgets, and the shipped studies validating."""

import copy
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT

from memlayers.models.config import FAMILIES
from memlayers.platform.cli.main import main
from memlayers.platform.study.cells import expand
from memlayers.platform.study.schema import StudyError
from memlayers.platform.study.validate import load_study, study_from_dict

BASE = {
    "name": "tiny",
    "data": {"source": "facts", "facts": {"people": 20, "values_per_attribute": 5, "renderings": 3}},
    "tokenizer": "word",
    "seq_len": 16,
    "grid": {"bases": ["nano"], "families": ["dense", "memory_plus"], "memory_sizes": ["4k"]},
    "budget": {"steps": 2},
    "seeds": [0],
    "train": {"batch_size": 4},
    "resources": {"workers": 1, "cpus_per_worker": 1},
}


def mutate(path: str, value, data=None):
    """A copy of BASE with `path` (dotted) set to `value` (DELETE removes it)."""
    data = copy.deepcopy(data or BASE)
    node = data
    *parents, leaf = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    if value is DELETE:
        node.pop(leaf, None)
    else:
        node[leaf] = value
    return data


DELETE = object()

# (case id, study mapping, the field the one error line must name)
MALFORMED = [
    ("unknown-family", mutate("grid.families", ["dense", "memory_plus", "mem+"]),
     "grid.families[2]: unknown family 'mem+'"),
    ("memory-not-square", mutate("grid.memory_sizes", [1000]), "grid.memory_sizes[0]: unknown memory size 1000"),
    ("memory-unknown-name", mutate("grid.memory_sizes", ["4k", "3k"]),
     "grid.memory_sizes[1]: unknown memory size '3k'"),
    ("unknown-top-key", mutate("epochs", 3), "epochs: unknown key"),
    ("unknown-grid-key", mutate("grid.sizes", ["4k"]), "grid.sizes: unknown key"),
    ("unknown-facts-key", mutate("data.facts.persons", 10), "data.facts.persons: unknown key"),
    ("unknown-memory-option", mutate("grid.memory", {"top_k": 8}), "grid.memory.top_k: unknown key"),
    ("unknown-override-key", mutate("grid.overrides", {"memory_plus": {"sizes": [1]}}),
     "grid.overrides.memory_plus.sizes: unknown key"),
    ("seq-len-type", mutate("seq_len", "long"), "seq_len: must be a positive integer"),
    ("batch-size-type", mutate("train.batch_size", "big"), "train.batch_size: expected an integer"),
    ("negative-budget", mutate("budget", {"tokens": -5}), "budget.tokens: must be > 0"),
    ("two-budgets", mutate("budget", {"tokens": 1000, "flops": 1e9}), "budget: give exactly one of"),
    ("memory-parallel", mutate("resources", {"workers": 2, "memory_parallel": 3}),
     "resources.memory_parallel: must divide"),
    ("memory-parallel-dense", mutate("resources", {"workers": 2, "memory_parallel": 2}),
     "resources.memory_parallel: 2 needs a family with column-sharded tables"),
    ("unknown-base", mutate("grid.bases", ["nano", "huge"]), "grid.bases[1]: unknown base 'huge'"),
    ("empty-grid", mutate("grid.families", []), "grid.families: empty grid"),
    ("duplicate-seeds", mutate("seeds", [0, 1, 0]), "seeds[2]: duplicate seed 0"),
    ("lr-range-inverted", mutate("lr", {"tune": True, "range": [1e-2, 1e-4]}), "lr.range: needs 0 < low < high"),
    ("moe-without-experts", mutate("grid.families", ["dense", "moe"]), "grid.experts: family 'moe' needs"),
    ("budget-in-train", mutate("train.steps", 10), "train.steps: the budget belongs in the budget section"),
    ("lr-twice", mutate("lr", 1e-3, mutate("train.lr", 1e-3)), "train.lr: the learning rate is given twice"),
    ("override-unknown-family", mutate("grid.overrides", {"moe": {"experts": [4]}}),
     "grid.overrides.moe: family 'moe' is not in grid.families"),
    ("memory-heads-zero", mutate("grid.memory", {"heads": 0}),
     "grid.memory.heads: must be >= 1, got 0 (memory_plus on nano)"),
    ("unknown-law", mutate("fit", {"laws": ["chinchila"]}), "fit.laws[0]: unknown law 'chinchila'"),
    ("missing-name", mutate("name", DELETE), "name: a study needs a name"),
    ("budget-buys-no-step", mutate("budget", {"flops": 10.0}), "budget.flops: 10 FLOPs buy no step"),
    ("family-lr-range", mutate("grid.overrides", {"memory_plus": {"lr": 3.0}}),
     "grid.overrides.memory_plus.lr: a fixed learning rate must be a number in (0, 1), got 3.0"),
    ("family-lr-unknown-base", mutate("grid.overrides", {"dense": {"lr": {"micro": 1e-2}}}),
     "grid.overrides.dense.lr.micro: 'micro' is not one of this family's bases (nano)"),
    ("family-lr-per-base-range", mutate("grid.overrides", {"dense": {"lr": {"nano": 0}}}),
     "grid.overrides.dense.lr.nano: a fixed learning rate must be a number in (0, 1), got 0"),
    ("family-lr-with-tuning", mutate("lr", {"tune": True}, mutate("grid.overrides", {"dense": {"lr": 1e-2}})),
     "grid.overrides.dense.lr: a family's fixed learning rate cannot be combined with lr.tune"),
    # names become folders (runs/<name>, <storage>/<name>): one safe path component, short
    *[(f"name-{case}", mutate("name", name), f"name: must be one folder name: letters, digits, '_', '.', '-', "
                                             f"starting with a letter or digit, got {name!r}")
      for case, name in (("newline", "tiny\n"), ("dotdot", ".."), ("hidden", ".tiny"), ("slash", "a/b"),
                         ("backslash", "a\\b"), ("control", "ti\x07ny"))],
    ("name-300-characters", mutate("name", "a" * 300), "name: at most 100 characters, got 300"),
    ("seed-past-64-bits", mutate("seeds", [0, 2**70]), "seeds[1]: expected an integer in [0, 2^63 - 1], got 1180591"),
    ("claim-selector-typo", mutate("fit", {"claims": [{"id": "c", "claim": "Memory+ beats dense", "metric": "val_loss",
                                                       "subject": {"family": "memory_plsu"},
                                                       "reference": {"family": "dense"}}]}),
     "fit.claims[0].subject: {'family': 'memory_plsu'} matches no cell of the grid"),
    ("claim-size-name", mutate("fit", {"claims": [{"id": "c", "claim": "Memory+ 4k beats dense", "metric": "val_loss",
                                                   "subject": {"family": "memory_plus", "memory_slots": "4k"},
                                                   "reference": {"family": "dense"}}]}),
     "fit.claims[0].subject: {'family': 'memory_plus', 'memory_slots': '4k'} matches no cell of the grid "
     "(memory_slots counts slots, e.g. 4096)"),
]


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """cwd and temp files inside tmp_path/work, so anything a command leaves behind is visible."""
    work = tmp_path / "work"
    scratch = tmp_path / "scratch"
    work.mkdir()
    scratch.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setenv("TMPDIR", str(scratch))
    return work, scratch


def _ray_initialized() -> bool:
    import ray
    return ray.is_initialized()


@pytest.mark.parametrize("case,data,expected", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_study_names_the_field_exits_2_and_leaves_nothing(case, data, expected, sandbox, capsys):
    work, scratch = sandbox
    path = work / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    ray_before = _ray_initialized()
    for action in ("validate", "run"):
        assert main(["study", action, str(path)]) == 2, action
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"{path}: {expected}"), lines[0]
    assert sorted(p.name for p in work.iterdir()) == ["bad.yaml"]   # no runs/<name>, mlflow.db, optuna.db
    assert list(scratch.iterdir()) == []                          # no Ray temp dir, no data cache
    assert _ray_initialized() == ray_before                       # no Ray session started here


def test_every_problem_is_reported_at_once(tmp_path):
    data = mutate("grid.families", ["dense", "mem+", "moe"])
    data = mutate("seeds", [1, 1], data)
    data = mutate("budget", {"steps": 5, "tokens": 100}, data)
    data = mutate("train.batchsize", 4, data)
    data = mutate("resources.workers", "two", data)
    with pytest.raises(StudyError) as caught:
        study_from_dict(data)
    paths = [e.path for e in caught.value.errors]
    for field in ("grid.families[1]", "seeds[1]", "budget", "train.batchsize", "resources.workers", "grid.experts"):
        assert field in paths, (field, paths)


def test_yaml_syntax_error_is_one_line_with_file_and_line(sandbox, capsys):
    work, _ = sandbox
    path = work / "broken.yaml"
    path.write_text("name: x\ngrid:\n  bases: [nano\n  families: [dense]\n")
    assert main(["study", "validate", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{path}:") and "invalid YAML" in lines[0]
    assert lines[0].split(":")[1].isdigit()  # the line number


def test_duplicate_yaml_key_is_refused(sandbox, capsys):
    work, _ = sandbox
    path = work / "dup.yaml"
    path.write_text(yaml.safe_dump(BASE) + "seeds: [1]\n")
    assert main(["study", "validate", str(path)]) == 2
    assert "duplicate key 'seeds'" in capsys.readouterr().err


def test_cli_subprocess_exit_code_and_no_ray_files(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(mutate("grid.families", ["dense", "memory_plus", "mem+"])))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    proc = subprocess.run([sys.executable, "-m", "memlayers.platform.cli.main", "study", "run", str(path)],
                          cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"{path}: grid.families[2]: unknown family 'mem+' "
                                   f"(expected one of {', '.join(FAMILIES)})")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "scratch"]
    assert list(scratch.iterdir()) == []


# ---- expansion ------------------------------------------------------------------------------

def test_cells_have_stable_ids_names_and_run_configs(tmp_path):
    study = study_from_dict(mutate("seeds", [0, 1]))
    cells = expand(study, vocab_size=100)
    assert [c.name for c in cells] == ["dense-nano-seed0", "dense-nano-seed1",
                                       "memory_plus-nano-4k-seed0", "memory_plus-nano-4k-seed1"]
    again = expand(study_from_dict(mutate("seeds", [0, 1])), vocab_size=100)
    assert [c.id for c in cells] == [c.id for c in again]
    assert len({c.id for c in cells}) == 4
    changed = expand(study_from_dict(mutate("train.batch_size", 8, mutate("seeds", [0, 1]))), vocab_size=100)
    assert not {c.id for c in changed} & {c.id for c in cells}  # content changed -> new cells
    cfg = cells[2].run_config(workdir=tmp_path, tracking_uri="sqlite:///x.db", parent_run_id="p123")
    assert cfg.model.family == "memory_plus" and cfg.model.memory_slots == 4096
    assert cfg.train.steps == 2 and cfg.train.seed == 0 and cfg.tracking.parent_run_id == "p123"
    assert cfg.tracking.tags == {"memlayers.role": "cell", "study": "tiny", "cell": cells[2].id, "seed": "0",
                                 "budget_kind": "steps", "budget": "2"}
    assert cfg.tracking.run_name == "memory_plus-nano-4k-seed0" and cfg.tracking.experiment == "tiny"


def test_flop_budget_makes_cells_flop_matched():
    data = mutate("grid", {"bases": ["nano", "micro"], "families": ["dense", "moe", "pkm", "memory_plus"],
                           "memory_sizes": ["4k", "16k"], "experts": [4]})
    study = study_from_dict(mutate("budget", {"flops": 3e10}, data))
    cells = expand(study, vocab_size=300)
    assert len(cells) == 2 * (1 + 1 + 2 + 2)
    per_step = 4 * 16
    for cell in cells:
        assert cell.train_flops <= 3e10 < cell.train_flops + cell.flops_per_token * per_step
        assert cell.tokens == cell.steps * per_step
    dense = [c for c in cells if c.family == "dense"]
    assert dense[0].steps > dense[1].steps  # the bigger base gets fewer tokens for the same FLOPs


def test_per_family_overrides_and_iso_flop_sweep():
    data = mutate("grid", {"bases": ["nano", "micro", "tiny"], "families": ["dense", "memory_plus", "moe"],
                           "memory_sizes": ["4k"], "experts": [4, 8],
                           "overrides": {"memory_plus": {"bases": ["micro"],
                                                         "memory_sizes": ["4k", "16k", 4096 * 4 * 4]},
                                         "moe": {"bases": ["nano"], "experts": [4]}}})
    study = study_from_dict(mutate("budget", {"iso_flops": [1e10, 3e10]}, data))
    cells = expand(study, vocab_size=300)
    names = [c.name for c in cells]
    assert sum(n.startswith("dense-") for n in names) == 3 * 2
    assert {c.memory_slots for c in cells if c.family == "memory_plus"} == {4096, 16384, 65536}
    assert {c.base for c in cells if c.family == "memory_plus"} == {"micro"}
    assert [c.experts for c in cells if c.family == "moe"] == [4, 4]
    assert "memory_plus-micro-64k-3e10F-seed0" in names and "moe-nano-4x-1e10F-seed0" in names
    assert len(set(names)) == len(names)


def test_a_family_lr_override_sets_its_cells_lr_and_ids_only():
    grid = {"bases": ["nano", "micro"], "families": ["dense", "memory_plus"], "memory_sizes": ["4k"]}
    plain = expand(study_from_dict(mutate("lr", 3e-3, mutate("grid", grid))), vocab_size=300)
    overrides = {"memory_plus": {"lr": 2e-2}, "dense": {"lr": {"micro": 1e-3}}}
    study = study_from_dict(mutate("lr", 3e-3, mutate("grid", {**grid, "overrides": overrides})))
    cells = expand(study, vocab_size=300)
    lrs = {(c.family, c.base): c.lr for c in cells}
    assert lrs == {("dense", "nano"): 3e-3, ("dense", "micro"): 1e-3,
                   ("memory_plus", "nano"): 2e-2, ("memory_plus", "micro"): 2e-2}
    uri = "sqlite:///w/mlflow.db"
    assert {(c.family, c.base): c.run_config(workdir=Path("w"), tracking_uri=uri).train.lr for c in cells} == lrs
    ids = {(c.family, c.base): c.id for c in plain}
    assert [c.id == ids[(c.family, c.base)] for c in cells] == [lrs[(c.family, c.base)] == 3e-3 for c in cells]


def test_paper_grid_validates_and_expands():
    study = load_study(REPO_ROOT / "studies" / "paper-grid.yaml")
    cells = expand(study)
    assert {c.base for c in cells} == {"134m", "373m", "720m", "1.3b"}
    assert {c.family for c in cells} == {"dense", "moe", "pkm", "peer", "memory_plus"}
    assert {c.model.moe["routing"] for c in cells if c.family == "moe"} == {"expert_choice"}
    assert {c.memory_slots for c in cells if c.family == "peer"} == {768 ** 2}
    slots = {c.memory_slots for c in cells if c.family == "memory_plus"}
    assert min(slots) == 256 ** 2 and max(slots) == 4096 ** 2
    assert all(c.resources.gpus_per_worker >= 1 for c in cells)
    for budget in study.budget.values():  # every cell of a budget within 0.1% of it
        spent = [c.train_flops for c in cells if c.budget["value"] == budget]
        assert all(0.999 * budget <= f <= budget for f in spent)


def test_validate_prints_the_cells_table(capsys):
    assert main(["study", "validate", str(REPO_ROOT / "studies" / "paper-grid.yaml")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("study paper-grid: valid;")
    header = out[2].split()
    assert header[:3] == ["id", "run", "name"] and "FLOPs/token" in header
    rows = out[3:]
    assert len(rows) == len(expand(load_study(REPO_ROOT / "studies" / "paper-grid.yaml")))
    assert any(r.split()[1] == "memory_plus-1.3b-16m-3e20F-seed0" for r in rows)


def test_other_seeds_make_their_own_study_and_bad_ones_exit_2(capsys):
    smoke = str(REPO_ROOT / "studies" / "smoke.yaml")
    assert main(["study", "validate", smoke, "--seeds", "3,4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("study smoke-seeds3-4: valid;") and "seeds [3, 4]" in out[0]
    assert "runs/smoke-seeds3-4" in out[1]
    assert {row.split()[1].rsplit("-seed", 1)[1] for row in out[3:]} == {"3", "4"}
    for seeds, expected in (("3,x", "seeds[1]: (--seeds) expected an integer in [0, 2^63 - 1], got 'x'"),
                            ("5,5", "seeds[1]: (--seeds) duplicate seed 5")):
        assert main(["study", "validate", smoke, "--seeds", seeds]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.strip() == f"{smoke}: {expected}"


@pytest.mark.parametrize("name", ["smoke", "quickstart"])
def test_shipped_cpu_studies_validate(name):
    study = load_study(REPO_ROOT / "studies" / f"{name}.yaml")
    cells = expand(study)
    families = {c.family for c in cells}
    assert {"dense", "memory_plus"} <= families
    assert all(c.resources.gpus_per_worker == 0 for c in cells)


def test_quickstart_design_is_flop_matched_with_enough_points_and_its_claims():
    """The embedded default compares families at matched training FLOPs, with at least five dense
    sizes spanning 4x in compute, three memory sizes and three seeds, and states its claims."""
    study = load_study(REPO_ROOT / "studies" / "quickstart.yaml")
    all_cells = expand(study)
    assert len(study.seeds) >= 3 and len({c.seed for c in all_cells}) >= 3
    cells = [c for c in all_cells if c.seed == study.seeds[0]]
    dense = {c.base: c.train_flops for c in cells if c.family == "dense"}
    assert len(dense) >= 5 and max(dense.values()) >= 4 * min(dense.values())
    memory_plus = [c for c in cells if c.family == "memory_plus"]
    assert len({c.memory_slots for c in memory_plus}) >= 3 and len({c.base for c in memory_plus}) == 1
    for cell in cells:
        if cell.family != "dense":
            assert cell.base == "nano"
            # a memory layer computes less than the FFN it replaces (the ~500-word vocabulary makes
            # the FFNs a large share of nano's FLOPs): PKM 4k is the farthest, at 0.89x
            assert abs(cell.train_flops / dense["nano"] - 1) <= 0.15, cell.name
    assert {"pkm", "moe"} <= {c.family for c in cells}
    claims = {c.id for c in study.fit.claims}
    assert {"recall_vs_dense", "loss_vs_memory", "memory_plus_vs_pkm", "memory_plus_vs_moe"} <= claims
