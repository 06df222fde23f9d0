"""Finetuning studies: field-named validation (exit 2) and a killed finetuning cell resumed on real Ray + MLflow."""

import pytest
import yaml
from test_finetune_methods import run_dict

from memlayers.platform.cli.main import main
from memlayers.platform.data.prepare import prepare_data
from memlayers.platform.study.progress import cell_runs
from memlayers.platform.study.validate import load_study
from memlayers.platform.train.loop import RunLoop
from memlayers.platform.train.run_config import run_config_from_dict


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = run_config_from_dict(run_dict())
    loop = RunLoop(cfg, prepare_data(cfg.data, tmp_path_factory.mktemp("cache")))
    loop.train_step()
    folder = tmp_path_factory.mktemp("source")
    loop.save(folder)
    return folder


def study_file(tmp_path, checkpoint, **finetune) -> str:
    data = {"name": "ft", "workdir": str(tmp_path / "wd"), "seeds": [0], "lr": 1e-2, "budget": {"steps": 6},
            "train": {"batch_size": 4, "eval_every": 3, "checkpoint_every": 3, "log_every": 3, "eval_batches": 2},
            "resources": {"cpus_per_worker": 1},
            "finetune": {"sources": [{"checkpoint": str(checkpoint)}], "methods": ["sparse_memory"],
                         "new_people": 20, "renderings": 2, "top_t": 8, "background": 16, "old_qa_items": 16,
                         **finetune},
            "fit": {"laws": [], "bootstrap": 0, "claims": [
                {"id": "forgets", "claim": "sparse forgets less than full", "metric": "forgetting",
                 "subject": {"method": "sparse_memory"}, "reference": {"method": "full"}}]}}
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("finetune, field", [
    ({"methods": ["sparse"]}, "finetune.methods[0]: unknown method 'sparse'"),
    ({"sources": [{"checkpoint": "/nonexistent/ckpt"}]}, "finetune.sources[0].checkpoint: /nonexistent/ckpt is not"),
    ({"sources": [{"study": "no-such-study", "cell": {"family": "dense"}}]}, "finetune.sources[0].study: no study"),
    ({"top_t": 257}, "finetune.top_t: 257 is more than the 256 slots"),
])
def test_invalid_finetuning_studies_exit_2_naming_the_field(tmp_path, checkpoint, capsys, finetune, field):
    path = study_file(tmp_path, checkpoint, **finetune)
    assert main(["study", "validate", path]) == 2
    captured = capsys.readouterr()
    assert field in captured.out + captured.err
    assert not (tmp_path / "wd").exists()


@pytest.mark.slow
def test_a_killed_finetuning_cell_resumes_and_the_study_is_not_rerun(tmp_path, checkpoint, ray_local):
    from memlayers.platform.study.controller import run_study
    path = study_file(tmp_path, checkpoint, methods=["full", "sparse_memory"])
    data = yaml.safe_load(open(path))
    data["train"]["fail_at_step"] = 5           # the trial's process dies once, after the step-3 checkpoint
    data["resources"]["max_failures"] = 1
    open(path, "w").write(yaml.safe_dump(data))
    study = load_study(path)
    first = run_study(study, poll_interval=0.5)
    assert set(first.states.values()) == {"done"}
    runs = cell_runs(first.tracking_uri, "ft")
    assert all([r.status for r in found] == ["FINISHED"] for found in runs.values())   # one run per cell
    for found in runs.values():
        metrics = found[0].metrics
        assert {"new_qa_exact_match", "old_qa_exact_match", "forgetting", "val_loss", "slots_changed"} <= set(metrics)
        assert found[0].tags["memlayers.attempts"] == "2"                          # it was killed and resumed
        if found[0].tags["method"] == "sparse_memory":  # every row changed was selected, before or after the kill
            assert 0 < metrics["slots_changed"] <= metrics["slots_selected"]
    assert {r[0].tags["method"] for r in runs.values()} == {"full", "sparse_memory"}
    again = run_study(study, poll_interval=0.5)
    assert again.results == {} and cell_runs(first.tracking_uri, "ft").keys() == runs.keys()

    from memlayers.dashboards.plot_continual import continual_plots, continual_table
    from memlayers.dashboards.study_data import load_study as load_study_data
    from memlayers.platform.tracking.study_ref import StudyRef
    data = load_study_data(StudyRef("ft", first.workdir, first.tracking_uri, None))
    plots = continual_plots(data)
    assert [p.key for p in plots] == ["continual"] and plots[0].png.startswith(b"\x89PNG")
    table = continual_table(data)
    assert [row.split(" | ")[0] for row in table[2:]] == ["| full", "| sparse_memory"]
