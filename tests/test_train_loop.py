"""The in-process training loop: learning, exact resume, budgets, schedules."""


import pytest
import torch

from memlayers.platform.data.prepare import prepare_data
from memlayers.platform.train.checkpoint import load_state, save_state
from memlayers.platform.train.loop import RunLoop, plan_run
from memlayers.platform.train.optim import lr_factor
from memlayers.platform.train.run_config import TrainConfig, run_config_from_dict


def tiny_run(**train) -> dict:
    return {
        "name": "t",
        "model": {"base": "nano", "family": "memory_plus", "memory_slots": 256, "memory": {"heads": 2, "topk": 8}},
        "data": {"source": "facts", "seq_len": 32, "facts": {"people": 60, "renderings": 3}},
        "train": {"steps": 8, "batch_size": 8, "eval_every": 4, "qa_eval_items": 16, **train},
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    cfg = run_config_from_dict(tiny_run())
    return prepare_data(cfg.data, tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("value_optimizer", ["lazy_adam", "row_adagrad", "adamw"])
def test_resuming_from_a_checkpoint_reproduces_the_uninterrupted_run(data, tmp_path, value_optimizer):
    cfg = run_config_from_dict(tiny_run(value_optimizer=value_optimizer))
    straight = RunLoop(cfg, data)
    losses = [straight.train_step()["loss"] for _ in range(4)]
    save_state(straight.state_dict(), tmp_path)
    losses += [straight.train_step()["loss"] for _ in range(4)]

    resumed = RunLoop(cfg, data)
    resumed.load_state_dict(load_state(tmp_path))
    assert resumed.step == 4
    resumed_losses = [resumed.train_step()["loss"] for _ in range(4)]
    assert resumed_losses == pytest.approx(losses[4:], rel=1e-5, abs=1e-6)
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["dense", "moe", "pkm", "memory_plus"])
def test_every_family_learns_and_reports_its_metrics(data, family):
    run = tiny_run(steps=30, lr=1e-2, value_lr=3e-2)
    run["model"] = {"base": "nano", "family": family}
    if family in ("pkm", "memory_plus"):
        run["model"].update(memory_slots=256, memory={"heads": 2, "topk": 8})
    if family == "moe":
        run["model"]["experts"] = 4
    loop = RunLoop(run_config_from_dict(run), data)
    first = loop.evaluate()
    metrics = [loop.train_step() for _ in range(30)]
    last = loop.evaluate()
    assert last["val_loss"] < first["val_loss"] - 0.5
    assert {"qa_exact_match", "qa_answer_nll"} <= set(last)
    assert 0 < last["qa_answer_nll"] < 50 and 0 <= last["qa_exact_match"] <= 1
    assert metrics[-1]["train_flops"] == pytest.approx(30 * loop.plan.tokens_per_step
                                                       * loop.plan.accounting.train_flops_per_token)
    if family in ("pkm", "memory_plus"):
        assert 0 < metrics[-1]["slot_fraction_read"] <= 1 and "slot_gini" in metrics[-1]
    if family == "moe":
        assert metrics[-1]["moe_imbalance"] >= 1


def test_budgets_in_tokens_and_flops_resolve_to_steps(data):
    by_tokens = plan_run(run_config_from_dict(tiny_run(steps=None, tokens=8 * 32 * 10)), data.tokenizer.vocab_size)
    assert by_tokens.steps == 10
    flops = by_tokens.train_flops
    by_flops = plan_run(run_config_from_dict(tiny_run(steps=None, flops=flops)), data.tokenizer.vocab_size)
    assert by_flops.steps == 10 and by_flops.train_flops == pytest.approx(flops)


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, warmup=0.1, schedule="cosine", min_lr_ratio=0.1)
    factors = [lr_factor(s, 100, cfg) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[-1] == pytest.approx(0.1, abs=1e-3)
