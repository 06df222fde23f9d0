"""`memlayers predict` and `memlayers plan` on joint laws: a known optimum found, the GPU-memory
constraint never exceeded, wrong files refused; the documented schemas of the law files; the
paper tables of `memlayers fit --format`; the joint law in `memlayers bench fit`."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import REPO_ROOT
from scipy.optimize import minimize_scalar

from memlayers.platform.cli.main import main
from memlayers.platform.laws.frontier import compute_optimal
from memlayers.platform.laws.joint import KIND, VERSION, load_joint
from memlayers.platform.laws.joint_forms import FORMS
from memlayers.platform.laws.joint_study import fit_joint_rows
from memlayers.platform.laws.joint_synthetic import TRUTH, reference_sizes, synthetic_points
from memlayers.platform.laws.plan import BYTES_PER_PARAM, USABLE_FRACTION, Constraints, optimum, parse_bytes

SCHEMAS = REPO_ROOT / "docs" / "schemas"


def truth_law(chosen: str = "effective_params") -> dict:
    """A joint.json record holding the true parameters of every synthetic form."""
    m_ref, n_ref = reference_sizes()
    return {"kind": KIND, "version": VERSION, "forms": {k: {"form": k, "params": dict(v)} for k, v in TRUTH.items()},
            "chosen": chosen, "m_ref": m_ref, "n_ref": n_ref, "moe": {"skipped": "none"}}


@pytest.fixture(scope="module")
def joint_file(tmp_path_factory):
    """`memlayers fit --law joint` on a synthetic CSV, with a few bootstrap replicates."""
    folder = tmp_path_factory.mktemp("joint")
    pts = synthetic_points("effective_params", 5)
    with open(folder / "points.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["params", "memory", "tokens", "loss"])
        writer.writerows(zip(pts["N"], pts["M"], pts["D"], pts["loss"]))
    assert main(["fit", "--law", "joint", "--csv", str(folder / "points.csv"), "--n", "params", "--m", "memory",
                 "--d", "tokens", "--bootstrap", "20", "--out", str(folder)]) == 0
    return folder / "joint.json"


def _validator(name: str):
    jsonschema = pytest.importorskip("jsonschema")
    from referencing import Registry, Resource

    schemas = {p.name: json.loads(p.read_text()) for p in SCHEMAS.glob("*.schema.json")}
    registry = Registry().with_resources(
        (url, Resource.from_contents(s)) for s in schemas.values() for url in (s["$id"], s["$id"].rsplit("/", 1)[1]))
    schema = schemas[name]
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, registry=registry)


def test_plan_finds_the_known_optimum_of_a_synthetic_law():
    law, compute, limit = truth_law(), 1e21, 2e8
    plan = optimum(law, compute, Constraints(gpu_memory=1e16, max_memory_params=limit))
    # with the memory size pinned at its bound, N_eff = N·(1 + κ(M/m_ref)^γ) makes the law Chinchilla's
    # with A·(1 + κ(M/m_ref)^γ)^(−α): its frontier is closed-form
    p = TRUTH["effective_params"]
    scaled = {**p, "A": p["A"] * (1 + p["kappa"] * (limit / law["m_ref"]) ** p["gamma"]) ** -p["alpha"]}
    expected = compute_optimal(scaled, [compute])
    best = plan["optimum"]
    assert best["m"] == pytest.approx(limit, rel=0.02) and best["binding"] == ["max_memory_params"]
    assert best["n"] == pytest.approx(expected["n_opt"][0], rel=0.02)
    assert best["d"] == pytest.approx(expected["d_opt"][0], rel=0.02)
    assert best["loss"] == pytest.approx(expected["loss"][0], rel=1e-6)
    dense = compute_optimal(p, [compute])
    assert plan["dense"]["n"] == pytest.approx(dense["n_opt"][0], rel=0.02) and plan["dense"]["m"] == 0
    assert best["loss"] < plan["dense"]["loss"] and best["multiplier"] > 1


@pytest.mark.parametrize("name", sorted(FORMS))
def test_gpu_memory_binds_and_is_never_exceeded(name):
    law, compute = truth_law(name), 1e24
    for gpus in (1, 8):
        constraints = Constraints(gpu_memory=parse_bytes("80GB"), gpus=gpus)
        plan = optimum(law, compute, constraints)
        cap = USABLE_FRACTION * 80e9
        for entry in (plan["optimum"], plan["dense"]):
            assert entry["bytes_per_gpu"] <= cap * (1 + 1e-9)
        assert plan["optimum"]["binding"] == ["gpu_memory"]
        # every replicate-free plan on the boundary: the best split of memory between N and M, found by
        # a one-dimensional search along BYTES_PER_PARAM·(N + M/gpus) = cap
        def along(log_n, gpus=gpus, cap=cap):
            n = np.exp(log_n)
            m = max(gpus * (cap / BYTES_PER_PARAM - n), 0.0)
            return float(FORMS[name].predict(TRUTH[name], n, m, compute / (6 * n), law["m_ref"], law["n_ref"]))

        ref = minimize_scalar(along, bounds=(np.log(1e6), np.log(cap / BYTES_PER_PARAM * 0.999999)),
                              method="bounded", options={"xatol": 1e-9})
        assert plan["optimum"]["loss"] <= ref.fun * (1 + 1e-6)
        assert plan["optimum"]["n"] == pytest.approx(np.exp(ref.x), rel=0.02)


def test_plan_intervals_cover_the_fitted_optimum_and_stay_feasible(joint_file, capsys):
    assert main(["plan", "--law", str(joint_file), "--compute", "1e21", "--gpu-memory", "80GB", "--gpus", "4",
                 "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    for key in ("n", "m", "d", "loss"):
        low, high = plan["intervals"][key]
        assert low <= plan[key] <= high, key
    cap = 0.8 * 80e9
    assert plan["optimum"]["bytes_per_gpu"] <= cap * (1 + 1e-9)
    assert BYTES_PER_PARAM * (plan["intervals"]["n"][1] + 0) <= cap * (1 + 1e-9)
    assert plan["moe"]["skipped"] and len(plan["frontier"]) == 9
    losses = [row["loss"] for row in plan["frontier"]]
    assert losses == sorted(losses, reverse=True)  # more compute, lower loss
    assert all(row["loss"] <= row["dense_loss"] for row in plan["frontier"])


def test_predict_gives_the_law_and_its_interval(joint_file, capsys):
    law = load_joint(joint_file)
    entry = law["forms"][law["chosen"]]
    assert main(["predict", "--law", str(joint_file), "--n", "3e8", "--m", "1e9", "--c", "1e20", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    d = 1e20 / (6 * 3e8)
    expected = FORMS[law["chosen"]].predict(entry["params"], 3e8, 1e9, d, law["m_ref"], law["n_ref"])
    assert out["loss"] == pytest.approx(float(expected), rel=1e-12)
    assert out["interval"][0] <= out["loss"] <= out["interval"][1]
    assert out["multiplier"] > 1  # a memory of 1e9 parameters is worth more than its compute
    assert main(["predict", "--law", str(joint_file), "--n", "3e8", "--m", "0", "--c", "1e20", "--json"]) == 0
    dense = json.loads(capsys.readouterr().out)
    assert dense["loss"] > out["loss"] and dense["multiplier"] <= 1 + 1e-9  # dense at 3e8 is not beyond optimal


@pytest.mark.parametrize("command", [["predict", "--n", "1e8", "--m", "0", "--d", "1e9"],
                                     ["plan", "--compute", "1e20"]])
def test_wrong_kind_or_version_is_refused_in_one_line(joint_file, tmp_path, capsys, command):
    record = json.loads(joint_file.read_text())
    cases = {"kind": {**record, "kind": "memlayers.study_laws"}, "version": {**record, "version": VERSION + 1},
             "law": {"law": "chinchilla", "params": {}}}
    for label, content in cases.items():
        path = tmp_path / f"{label}.json"
        path.write_text(json.dumps(content))
        assert main([command[0], "--law", str(path), *command[1:]]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and ("kind" in err or "version" in err), err
    assert main(["plan", "--law", str(joint_file), "--compute", "1e20", "--gpu-memory", "lots"]) == 2
    assert "--gpu-memory" in capsys.readouterr().err


def test_joint_json_follows_its_schema(joint_file):
    record = json.loads(joint_file.read_text())
    validator = _validator("joint.schema.json")
    validator.validate(record)
    broken = {**record, "forms": {**record["forms"], "additive": {**record["forms"]["additive"], "params": {}}}}
    assert not validator.is_valid(broken)
    assert not validator.is_valid({**record, "version": 2})


def test_law_and_laws_json_follow_their_schemas(tmp_path):
    from test_laws_study import study_rows

    from memlayers.platform.laws.chinchilla import fit_chinchilla
    from memlayers.platform.laws.io import dumps, save_fit
    from memlayers.platform.laws.study import fit_study

    pts = synthetic_points("additive", 0)
    fit = fit_chinchilla(pts["N"], pts["D"], pts["loss"], bootstrap=5)
    saved = json.loads(save_fit(fit, tmp_path)[0].read_text())
    _validator("law.schema.json").validate(saved)
    assert not _validator("law.schema.json").is_valid({**saved, "params": {"A": 1.0}})
    rows = [r for r in study_rows() if r["family"] != "memory_plus" or r["base"] == "tiny"]  # every kind of law
    laws = json.loads(dumps(fit_study(rows, bootstrap=0)))
    assert laws["compute_laws"] and laws["memory_laws"] and laws["multipliers"]
    validator = _validator("laws.schema.json")
    validator.validate(laws)
    assert not validator.is_valid({**laws, "compute_laws": {"dense": {"law": "cubic"}}})


def test_fit_format_prints_tables_for_a_paper(tmp_path, capsys):
    c = np.geomspace(1e15, 1e18, 8)
    path = tmp_path / "c.csv"
    path.write_text("c,loss\n" + "\n".join(f"{x},{1.8 + 60 * x ** -0.11}" for x in c) + "\n")
    base = ["fit", "--csv", str(path), "--law", "compute", "--c", "c", "--loss", "loss", "--format"]
    assert main([*base, "csv"]) == 0
    rows = list(csv.reader(capsys.readouterr().out.splitlines()))
    assert rows[0] == ["law", "parameter", "value", "low", "high"]
    assert {r[1]: float(r[2]) for r in rows[1:]}["alpha"] == pytest.approx(0.11, rel=1e-3)
    assert main([*base, "md"]) == 0
    md = capsys.readouterr().out.splitlines()
    assert md[0].startswith("| law | parameter") and len(md) == 5 and "| compute | alpha | 0.11 |" in md[-1]
    assert main([*base, "latex"]) == 0
    tex = capsys.readouterr().out
    assert r"\begin{tabular}" in tex and r"compute & alpha & 0.11 & -- & -- \\" in tex


def test_joint_law_of_a_study_fits_dense_memory_and_moe_rows():
    pts = synthetic_points("effective_params", 7)
    rows = []
    for i, (n, m, d, loss) in enumerate(zip(pts["N"], pts["M"], pts["D"], pts["loss"])):
        family, slots = ("memory_plus", 1024) if m > 0 else ("dense", 0)
        rows.append({"cell": f"c{i}", "family": family, "memory_slots": slots, "experts": 0, "active_params": n,
                     "total_params": n + m, "train_flops": 6 * n * d, "val_loss": loss})
        if m == 0:  # an MoE cell beside each dense one: the dense law at 1.3x its active parameters
            moe_loss = FORMS["additive"].predict({**TRUTH["additive"], "G": 0.0}, 1.3 * n, 0.0, d, 1, 1)
            rows.append({"cell": f"m{i}", "family": "moe", "memory_slots": 0, "experts": 8, "active_params": n,
                         "total_params": 8 * n, "train_flops": 6 * n * d, "val_loss": float(moe_loss)})
    rows.append({"cell": "x", "family": "pkm", "memory_slots": 4096, "experts": 0, "active_params": 1e8,
                 "total_params": 2e8, "train_flops": 1e18, "val_loss": 2.0})  # another family: left out
    record = fit_joint_rows(rows, bootstrap=0)
    assert record["n_points"] == 50 and record["n_memory_points"] == 40 and record["families"]["moe_rows"] == 10
    assert record["chosen"] == "effective_params"
    assert record["moe"]["params"]["alpha"] == pytest.approx(TRUTH["additive"]["alpha"], abs=0.01)
    plan = optimum(record, 1e21, Constraints(gpus=8))
    moe_frontier = compute_optimal(record["moe"]["params"], [1e21])  # MoE memory is not checked: its own frontier
    assert plan["moe"]["n"] == pytest.approx(moe_frontier["n_opt"][0], rel=0.02)
    assert plan["moe"]["loss"] == pytest.approx(moe_frontier["loss"][0], rel=1e-6)
    with pytest.raises(ValueError, match="^--family: no finished 'peer' cells"):
        fit_joint_rows(rows, memory_family="peer")


@pytest.mark.slow
def test_bench_fit_times_the_joint_law(capsys):
    assert main(["bench", "fit", "--plain-starts", "1", "--joint-bootstrap", "10", "--json"]) == 0
    joint = json.loads(capsys.readouterr().out)["joint"]
    assert joint["forms"] == sorted(FORMS, key=list(FORMS).index) and joint["replicates"] == 10
    assert joint["cpu_s"] > 0 and joint["chosen"] == joint["generated_by"]


def test_report_figures_of_a_joint_law(joint_file, tmp_path):
    from memlayers.dashboards.plot_joint import joint_plots

    assert joint_plots(tmp_path) == []  # a study without a joint law: the report is unchanged
    (tmp_path / "laws").mkdir()
    (tmp_path / "laws" / "joint.json").write_text(joint_file.read_text())
    plots = joint_plots(tmp_path)
    assert [p.key for p in plots] == ["joint_surface", "joint_frontier"]
    assert all(p.ok and p.png.startswith(b"\x89PNG") for p in plots)
    (tmp_path / "laws" / "joint.json").write_text(json.dumps({"kind": "memlayers.study_laws"}))
    assert "kind" in joint_plots(tmp_path)[0].note


def test_fit_joint_of_a_study_reads_its_runs_from_mlflow(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("jl", artifact_location=(tmp_path / "artifacts").as_uri())
    pts = synthetic_points("interaction", 4)
    keep = np.isin(pts["N"], np.unique(pts["N"])[::2]) & (pts["M"] < 5e8)  # 3 bases x {0, 3 sizes} x 2 budgets
    for i in np.flatnonzero(keep):
        n, m, d = (float(pts[k][i]) for k in ("N", "M", "D"))
        tags = {"memlayers.role": "cell", "study": "jl", "cell": f"c{i}", "base": f"b{n:.3g}",
                "family": "memory_plus" if m > 0 else "dense", "memory_slots": str(int(m // 1000)),
                "experts": "0", "train_flops": repr(6 * n * d), "total_params": repr(n + m), "active_params": repr(n)}
        run = client.create_run(exp, tags=tags).info.run_id
        client.log_metric(run, "val_loss", float(pts["loss"][i]))
        client.set_terminated(run, "FINISHED")
    study = tmp_path / "jl.yaml"
    study.write_text(f"name: jl\nworkdir: {tmp_path / 'work'}\ntracking:\n  uri: {uri}\n")
    assert main(["fit", "--law", "joint", "--study", str(study)]) == 0
    out = capsys.readouterr().out
    record = load_joint(tmp_path / "work" / "laws" / "joint.json")
    assert f"wrote {tmp_path / 'work' / 'laws' / 'joint.json'}" in out
    assert record["n_points"] == 24 and record["n_memory_points"] == 18 and record["provenance"]["runs"] == 24
    per_base = record["forms"]["interaction"]["held_out"]["leave_one_base_out"]["per_base"]
    assert sorted(per_base) == sorted({f"b{n:.3g}" for n in pts["N"][keep]})  # held out by the base tag
    assert record["moe"] == {"skipped": "no MoE rows"}
