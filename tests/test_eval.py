"""Downstream evaluation: nq_open / triviaqa exact match, F1 and answer NLL by hand on tiny local
files with a model whose outputs the test fixes; facts_qa through the harness equals the training
loop's own QA metrics; bad input is one line, exit 2, nothing logged; scores logged to MLflow."""

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from memlayers.platform.cli.main import main
from memlayers.platform.data.tokenizers import ByteTokenizer
from memlayers.platform.eval.lm_adapter import MemlayersLM
from memlayers.platform.eval.metrics import exact_match, token_f1
from memlayers.platform.eval.runner import evaluate_model

LOGIT = 10.0
VOCAB = ByteTokenizer.vocab_size
LSE = math.log(math.exp(LOGIT) + VOCAB - 1)  # log-sum-exp of one logit 10 and 257 zeros

NQ = [  # question, gold answers, what the model answers
    ("who wrote hamlet", ["William Shakespeare", "Shakespeare"], "Shakespeare"),   # the second gold: 1
    ("capital of france", ["Paris"], "The Paris"),                                  # nq drops "The ": 1
    ("largest planet", ["Jupiter"], "Saturn"),                                      # 0
    ("boiling point of water", ["100", "100 degrees"], "100 degrees Celsius"),     # 0
]
TRIVIA = [  # question, value, aliases, what the model answers
    ("Which planet is the red planet", "Mars", ["Mars", "mars planet"], "mars"),     # EM 1 (case), F1 1
    ("Who painted the Mona Lisa", "Leonardo da Vinci", ["Leonardo da Vinci", "Da Vinci", "Leonardo"],
     "Leonardo di ser Piero da Vinci"),                                              # EM 0, F1 2/3
    ("What is the chemical symbol for gold", "Au", ["Au"], "Ag"),                    # 0, 0
]


class CannedModel(nn.Module):
    """Bytes in, logits out: after '<question>?\\nA:' (or 'Answer:') it spells ' <answer>\\n' with
    logit 10 on the next byte, 0 elsewhere; off that path (or anywhere else) it predicts '\\n'."""

    def __init__(self, answers: dict[str, str]) -> None:
        super().__init__()
        self.answers, self.anchor = answers, nn.Parameter(torch.zeros(1))

    def next_byte(self, text: str) -> int:
        for question, answer in self.answers.items():
            at = text.rfind(question + "?\n")
            if at < 0:
                continue
            rest = text[at + len(question) + 2:]
            for label in ("Answer:", "A:"):
                if rest.startswith(label):
                    said, target = rest[len(label):], f" {answer}\n"
                    if target.startswith(said) and len(said) < len(target):
                        return ord(target[len(said)])
        return ord("\n")

    def forward(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        logits_BSW = torch.zeros(*tokens_BS.shape, VOCAB)
        for b, row in enumerate(tokens_BS.tolist()):
            for s in range(len(row)):
                text = bytes(i for i in row[:s + 1] if i < 256).decode()
                logits_BSW[b, s, self.next_byte(text)] = LOGIT
        return logits_BSW


def _common_prefix(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _nll(gold: str, said: str) -> float:
    """-log p(' gold' | prompt) under CannedModel: every byte costs LSE, minus 10 where it is the
    byte the model predicts (the bytes shared with ' said\\n', from the start)."""
    continuation = f" {gold}"
    return len(continuation) * LSE - LOGIT * _common_prefix(continuation, f" {said}\n")


@pytest.fixture(scope="module")
def qa_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("qa")
    (root / "nq_open").mkdir()
    (root / "nq_open" / "validation.jsonl").write_text(
        "".join(json.dumps({"question": q, "answer": golds}) + "\n" for q, golds, _ in NQ))
    (root / "triviaqa").mkdir()
    (root / "triviaqa" / "validation.jsonl").write_text("".join(
        json.dumps({"question": q, "answer": {"value": v, "aliases": a}}) + "\n" for q, v, a, _ in TRIVIA))
    return root


def canned_lm() -> MemlayersLM:
    answers = {q: said for q, _, said in NQ} | {q: said for q, _, _, said in TRIVIA}
    return MemlayersLM(CannedModel(answers), ByteTokenizer(), max_length=256, use_cache=False, batch_size=3)


def test_the_metrics_are_the_harness_normalisation_and_squad_f1():
    assert exact_match("the Paris", ["Paris"], regexes_to_ignore=[r"\b(?:The |the |An |A |The |a |an )"]) == 1.0
    assert exact_match("the Paris", ["Paris"]) == 0.0          # triviaqa keeps articles in exact match
    assert exact_match("PARIS!", ["paris"]) == 1.0
    assert token_f1("Leonardo di ser Piero da Vinci", ["Leonardo da Vinci", "Da Vinci"]) == pytest.approx(2 / 3)
    assert token_f1("the Mars", ["Mars"]) == 1.0


def test_nq_open_and_triviaqa_scores_equal_a_hand_computation(qa_dir):
    scores = {(s.task, s.metric): s.value for s in evaluate_model(None, ["nq_open", "triviaqa"], data_dir=qa_dir,
                                                                  lm=canned_lm())}
    assert scores[("nq_open", "exact_match")] == pytest.approx(2 / 4)
    assert scores[("triviaqa", "exact_match")] == pytest.approx(1 / 3)
    assert scores[("triviaqa", "f1")] == pytest.approx((1 + 2 / 3 + 0) / 3)
    nq_nll = sum(_nll(golds[0], said) for _, golds, said in NQ) / len(NQ)
    trivia_nll = sum(_nll(value, said) for _, value, _, said in TRIVIA) / len(TRIVIA)
    assert scores[("nq_open", "answer_nll")] == pytest.approx(nq_nll, rel=1e-6)
    assert scores[("triviaqa", "answer_nll")] == pytest.approx(trivia_nll, rel=1e-6)
    assert set(scores) == {("nq_open", "exact_match"), ("nq_open", "answer_nll"), ("triviaqa", "exact_match"),
                           ("triviaqa", "f1"), ("triviaqa", "answer_nll")}


def test_limit_takes_the_first_items_and_generation_stops_at_the_stop_strings(qa_dir):
    lm = canned_lm()
    scores = {(s.task, s.metric): s.value for s in evaluate_model(None, ["nq_open"], data_dir=qa_dir, limit=2, lm=lm)}
    assert scores[("nq_open", "exact_match")] == 1.0  # the first two answers are right

    class Request:
        args = ("Q: who wrote hamlet?\nA:", {"until": ["\n", "."], "max_gen_toks": 40})
    assert lm.generate_until([Request()]) == [" Shakespeare"]


# ---- real checkpoints: one tiny facts run, trained in-process, tracked in a local MLflow store ------

@pytest.fixture(scope="module")
def facts_run(tmp_path_factory):
    """(checkpoint dir, the loop's own QA metrics at limit 32, MLflow uri, run id)."""
    from memlayers.platform.data.prepare import prepare_data
    from memlayers.platform.tracking import client as tracking
    from memlayers.platform.train.loop import RunLoop
    from memlayers.platform.train.run_config import run_config_from_dict

    root = tmp_path_factory.mktemp("facts")
    cfg = run_config_from_dict({
        "name": "evaltest", "model": {"base": "nano", "family": "memory_plus", "memory_slots": 1024},
        "data": {"source": "facts", "tokenizer": "word", "seq_len": 32,
                 "facts": {"people": 60, "values_per_attribute": 8, "renderings": 4}},
        "train": {"steps": 24, "batch_size": 8, "lr": 1e-2, "qa_eval_items": 32, "eval_batches": 1}})
    torch.manual_seed(0)
    loop = RunLoop(cfg, prepare_data(cfg.data, root / "cache"))
    while not loop.done:
        loop.train_step()
    metrics = loop.evaluate()
    loop.save(root / "checkpoint")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    experiment = tracking.ensure_experiment(uri, "evaltest", root / "mlartifacts")
    run_id = tracking.create_run(uri, experiment, "evaltest", {"checkpoint": str(root / "checkpoint")})
    tracking.set_status(uri, run_id, "FINISHED")
    return root / "checkpoint", metrics, uri, run_id


def _eval_metrics(uri: str, run_id: str) -> dict:
    from memlayers.platform.tracking.client import client_for
    return {k: v for k, v in client_for(uri).get_run(run_id).data.metrics.items() if k.startswith("eval/")}


def test_facts_qa_through_the_harness_equals_the_training_loops_qa_metrics(facts_run):
    from memlayers.platform.eval.loading import load_trained

    checkpoint, metrics, _, _ = facts_run
    scores = {s.metric: s.value for s in evaluate_model(load_trained(checkpoint), ["facts_qa"], limit=32)}
    assert scores["exact_match"] == metrics["qa_exact_match"]
    assert scores["answer_nll"] == pytest.approx(metrics["qa_answer_nll"], rel=1e-5)


@pytest.mark.parametrize("args, words", [
    (["--tasks", "nq_open", "--data-dir", "{missing}"], "nq_open/validation.jsonl"),
    (["--tasks", "triviaqa"], "task triviaqa: needs --data-dir"),
    (["--tasks", "no_such_task"], "unknown task no_such_task"),
    (["--tasks", "hellaswag"], "task hellaswag: its data is not reachable"),
    (["--tasks", "facts_qa", "--limit", "0"], "--limit"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_is_logged(facts_run, tmp_path, capsys, args, words):
    _, _, uri, run_id = facts_run
    args = [a.replace("{missing}", str(tmp_path / "nothing")) for a in args]
    assert main(["eval", run_id, "--tracking-uri", uri, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert _eval_metrics(uri, run_id) == {}


NQ_LINE = json.dumps({"question": "who wrote hamlet", "answer": ["Shakespeare"]})


@pytest.mark.parametrize("task, text, words", [
    ("nq_open", '{"question": "q", "answer": "Paris"}\n', ":1: answer: expected a non-empty list of strings"),
    ("nq_open", NQ_LINE + "\n{not json\n", ":2: not JSON"),
    ("nq_open", '{"answer": ["x"]}\n', ":1: question: expected a non-empty string"),
    ("nq_open", "", ": no questions"),
    ("triviaqa", '{"question": "q", "answer": ["Mars"]}\n', ':1: answer: expected {"value": str'),
    ("triviaqa", '{"question": "q", "answer": {"value": "Mars"}}\n', ":1: answer.aliases: expected"),
])
def test_a_malformed_data_file_is_one_line_naming_file_line_and_field(facts_run, tmp_path, capsys, task, text, words):
    _, _, uri, run_id = facts_run
    (tmp_path / task).mkdir()
    (tmp_path / task / "validation.jsonl").write_text(text)
    assert main(["eval", run_id, "--tracking-uri", uri, "--tasks", task, "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{task}/validation.jsonl{words}" in err[0], err
    assert _eval_metrics(uri, run_id) == {}


def test_generation_fits_a_context_no_longer_than_the_tasks_budget(facts_run, qa_dir, capsys):
    """The facts run's context is 32 tokens, nq_open's generation budget 32: the budget shrinks and
    the prompt keeps its end instead of the key/value cache overflowing."""
    from memlayers.platform.eval.lm_adapter import DEFAULT_MAX_GEN_TOKS, fit_context

    checkpoint, _, uri, run_id = facts_run
    assert json.loads((checkpoint / "meta.json").read_text())["run"]["data"]["seq_len"] <= DEFAULT_MAX_GEN_TOKS
    assert main(["eval", run_id, "--tracking-uri", uri, "--tasks", "nq_open", "--data-dir", str(qa_dir),
                 "--no-log", "--json"]) == 0
    rows = {(r["task"], r["metric"]): r["value"] for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {("nq_open", "exact_match"), ("nq_open", "answer_nll")}
    assert 0 <= rows[("nq_open", "exact_match")] <= 1 and rows[("nq_open", "answer_nll")] > 0
    assert fit_context([list(range(40)), [7]], 32, 32) == ([list(range(24, 40)), [7]], 16)
    assert fit_context([[1, 2, 3]], 8, 32) == ([[1, 2, 3]], 8)   # what fits is left alone


def test_the_eval_stage_waits_at_most_its_timeout_for_the_next_scores(facts_run, ray_local, tmp_path):
    import time

    from memlayers.platform.eval.stage import run_eval_stage
    from memlayers.platform.study.schema import EvalConfig
    from memlayers.platform.tracking import client as tracking
    from memlayers.platform.tracking.conventions import run_tags

    checkpoint, _, uri, _ = facts_run  # the module's store, another experiment: no store to create
    experiment = tracking.ensure_experiment(uri, "stagewait", tmp_path / "mlartifacts")
    run_id = tracking.create_run(uri, experiment, "cell0", {**run_tags("cell", "stagewait"), "cell": "c0",
                                                            "checkpoint": str(checkpoint)})
    tracking.set_status(uri, run_id, "FINISHED")
    lines: list[str] = []
    started = time.time()
    # no evaluation loads its checkpoint and the harness within 0.05 s: the wait ends, the cell is named
    assert run_eval_stage("stagewait", uri, EvalConfig(tasks=["facts_qa"], limit=8, timeout_s=0.05), lines.append) == 0
    assert time.time() - started < 20, lines
    assert any("no scores came in 0.05 s (eval.timeout_s); cancelled the evaluation of cell0" in line
               for line in lines), lines
    assert _eval_metrics(uri, run_id) == {}


def test_a_target_that_names_nothing_is_refused(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nowhere"), "--tasks", "facts_qa"]) == 2
    assert "TARGET" in capsys.readouterr().err


def test_memlayers_eval_of_a_run_id_prints_json_and_logs_the_scores(facts_run, capsys):
    checkpoint, metrics, uri, run_id = facts_run
    assert main(["eval", run_id, "--tracking-uri", uri, "--tasks", "facts_qa", "--limit", "32", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["run_id"], r["task"], r["metric"]) for r in rows} == {(run_id, "facts_qa", "exact_match"),
                                                                    (run_id, "facts_qa", "answer_nll")}
    logged = _eval_metrics(uri, run_id)
    assert logged["eval/facts_qa/exact_match"] == metrics["qa_exact_match"]
    assert logged["eval/facts_qa/answer_nll"] == pytest.approx(metrics["qa_answer_nll"], rel=1e-5)
    # a checkpoint folder is evaluated too, and nothing is logged for it
    assert main(["eval", str(checkpoint), "--tasks", "facts_qa", "--limit", "8", "--json"]) == 0
    assert [r["run_id"] for r in json.loads(capsys.readouterr().out)] == [None, None]


def test_bench_decode_prints_the_four_families_side_by_side(capsys):
    assert main(["bench", "decode", "--repeats", "1", "--new", "4", "--batches", "1,2", "--vocab", "64"]) == 0
    out = capsys.readouterr().out
    for family in ("dense", "moe", "pkm", "memory_plus"):
        assert family in out
    assert "tokens/s" in out and "ms/token" in out


def test_the_laws_fit_downstream_scores_against_memory_size():
    from memlayers.platform.laws.study import fit_memory_laws

    rows = [{"run_id": f"r{m}", "base": "nano", "family": "memory_plus", "memory_slots": m, "val_loss": 3 - 0.1 * i,
             "eval/nq_open/exact_match": 0.1 + 0.1 * i, "eval/nq_open/answer_nll": 5 - 0.5 * i}
            for i, m in enumerate((1024, 4096, 16384, 65536))]
    laws = fit_memory_laws(rows, [])["nano/memory_plus"]
    assert laws["eval/nq_open/exact_match"]["law"] == "recall"
    assert laws["eval/nq_open/answer_nll"]["law"] == "memory"
    assert "eval/triviaqa/f1" not in laws


@pytest.mark.parametrize("section, words", [
    ({"tasks": []}, "eval.tasks: name at least one task"),
    ({"tasks": ["nq_open"]}, "eval.data_dir: task nq_open reads"),
    ({"tasks": ["facts_qa", "facts_qa"]}, "eval.tasks[1]: task facts_qa named twice"),
    ({"tasks": ["facts_qa"], "limit": 0}, "eval.limit: must be >= 1"),
    ({"tasks": ["facts_qa"], "shots": 2}, "eval.shots: unknown key"),
])
def test_a_study_eval_section_is_validated_with_field_named_errors(section, words):
    import yaml
    from conftest import REPO_ROOT

    from memlayers.platform.study.schema import StudyError
    from memlayers.platform.study.validate import study_from_dict

    data = yaml.safe_load((REPO_ROOT / "studies" / "smoke.yaml").read_text())
    with pytest.raises(StudyError) as error:
        study_from_dict({**data, "eval": section})
    assert any(words in line for line in error.value.lines()), error.value.lines()
    assert study_from_dict({**data, "eval": {"tasks": ["facts_qa"], "limit": 32}}).eval.limit == 32


# ---- the smoke study on Ray: the eval stage, then `memlayers eval` on the study ---------------------

@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory, ray_local):
    """The smoke study with an eval stage (facts_qa, limit 32), run once for the module."""
    import yaml
    from conftest import REPO_ROOT

    from memlayers.platform.study.controller import run_study
    from memlayers.platform.study.validate import load_study

    root = tmp_path_factory.mktemp("smoke")
    data = yaml.safe_load((REPO_ROOT / "studies" / "smoke.yaml").read_text())
    data.update(name="evalsmoke", workdir=str(root / "wd"), fit={"enabled": False},
                eval={"tasks": ["facts_qa"], "limit": 32})
    path = root / "evalsmoke.yaml"
    path.write_text(yaml.safe_dump(data))
    lines: list[str] = []
    result = run_study(load_study(path), out=lines.append, poll_interval=0.5)
    assert result.ok, lines
    return path, result, lines


@pytest.mark.slow
def test_the_study_stage_and_memlayers_eval_report_each_cells_own_qa_exact_match(smoke_study, capsys):
    from memlayers.platform.eval.stage import run_eval_stage
    from memlayers.platform.study.progress import cell_runs, latest
    from memlayers.platform.study.validate import load_study

    path, result, lines = smoke_study
    runs = {r.run_id: r for r in (latest(found) for found in cell_runs(result.tracking_uri, "evalsmoke").values())}
    assert len(runs) == 2 and any("eval: 2/2 cells evaluated" in line for line in lines), lines
    for run in runs.values():  # the stage logged the harness's facts_qa beside the loop's own metrics
        assert run.metrics["eval/facts_qa/exact_match"] == run.metrics["qa_exact_match"]
        assert run.metrics["eval/facts_qa/answer_nll"] == pytest.approx(run.metrics["qa_answer_nll"], rel=1e-5)
    # resumable: a second stage finds every cell evaluated
    again: list[str] = []
    assert run_eval_stage("evalsmoke", result.tracking_uri, load_study(path).eval, again.append) == 0
    assert again == ["eval: every finished cell already has its scores"]

    assert main(["eval", str(path), "--tasks", "facts_qa", "--limit", "32", "--json", "--no-log"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["run_id"] for r in rows} == set(runs)
    for row in rows:
        if row["metric"] == "exact_match":
            assert row["value"] == runs[row["run_id"]].metrics["qa_exact_match"]
