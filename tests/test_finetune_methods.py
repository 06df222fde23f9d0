"""Finetuning methods in-process: TF-IDF slot selection against numpy, what each method may change."""

import numpy as np
import pytest
import torch

from memlayers.models.lora import LoRALinear, merge_lora
from memlayers.platform.data.prepare import prepare_data
from memlayers.platform.finetune.loop import FinetuneLoop
from memlayers.platform.finetune.slots import tfidf_scores, top_slots
from memlayers.platform.train.loop import RunLoop
from memlayers.platform.train.run_config import run_config_from_dict

DATA = {"source": "facts", "seq_len": 16, "facts": {"people": 64, "renderings": 2, "name_words": 2,
                                                    "values_per_attribute": 8,
                                                    "phrasing": "terse", "templates_per_attribute": 1}}
VALUES = "memory_values.weight"
MODEL = {"base": "femto", "family": "memory_plus", "memory_slots": 256, "memory": {"heads": 2, "topk": 4}}


def run_dict(**finetune) -> dict:
    out = {"name": "ft", "model": MODEL, "data": DATA,
           "train": {"steps": 6, "batch_size": 4, "eval_every": 6, "qa_eval_items": 8, "lr": 1e-2, "value_lr": 5e-2,
                     "warmup": 0.0}}
    if finetune:
        out["finetune"] = {"new_people": 20, "renderings": 2, "top_t": 8, "background": 16, "old_qa_items": 16,
                           "lora": {"rank": 2}, **finetune}
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A briefly pretrained checkpoint and its prepared data."""
    cfg = run_config_from_dict(run_dict())
    data = prepare_data(cfg.data, tmp_path_factory.mktemp("cache"))
    loop = RunLoop(cfg, data)
    for _ in range(3):
        loop.train_step()
    folder = tmp_path_factory.mktemp("source")
    loop.save(folder)
    return folder, data, {k: v.clone() for k, v in loop.model.state_dict().items()}


def finetuned(source, method: str, **extra) -> FinetuneLoop:
    folder, data, _ = source
    loop = FinetuneLoop(run_config_from_dict(run_dict(method=method, checkpoint=str(folder), **extra)), data)
    while not loop.done:
        loop.train_step()
    return loop


def numpy_ranking(counts: np.ndarray, df: np.ndarray, documents: int, t: int) -> list[int]:
    """TF-IDF written out independently: score = count/total * ln((D+1)/(df+1)); best first, ties by index."""
    total = max(counts.sum(), 1)
    scores = [(c / total) * np.log((documents + 1) / (d + 1)) for c, d in zip(counts.tolist(), df.tolist())]
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return [i for i in ranked[:t] if scores[i] > 0]


def test_slot_selection_equals_a_numpy_tfidf_ranking_including_ties():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = 64
        counts = rng.integers(0, 4, n)          # few distinct values: many tied scores
        df = rng.integers(0, 6, n)
        df[rng.integers(0, n, 5)] = 10           # read by every background document: idf 0
        t = int(rng.integers(1, 40))
        got = top_slots(tfidf_scores(torch.from_numpy(counts), torch.from_numpy(df), 10), t).tolist()
        assert got == numpy_ranking(counts, df, 10, t), trial
    tied = top_slots(tfidf_scores(torch.tensor([2, 1, 2, 2, 0]), torch.tensor([0, 0, 0, 0, 0]), 4), 2)
    assert tied.tolist() == [0, 2]               # equal scores: the smaller slot index first


def changed(before: dict, after: dict) -> set[str]:
    return {k for k, v in before.items() if not torch.equal(v, after[k])}


def test_sparse_memory_changes_only_the_selected_value_rows(source):
    loop = finetuned(source, "sparse_memory")
    before = source[2]
    after = loop.model.state_dict()
    assert changed(before, after) == {VALUES}
    rows_changed = (after[VALUES] != before[VALUES]).any(dim=1)
    selected = loop.sparse.selected_N
    assert rows_changed.any() and not (rows_changed & ~selected).any()   # every changed row was selected
    assert int(selected.sum()) <= 8 * loop.step                       # at most top_t per step
    assert set(loop.optimizers.dense.state) <= set(loop.model.value_parameters())  # frozen weights: no state
    metrics = loop.evaluate()
    assert metrics["slots_changed"] == float(rows_changed.sum())


def test_memory_changes_only_value_tables_and_full_changes_more(source):
    assert changed(source[2], finetuned(source, "memory").model.state_dict()) == {VALUES}
    full = changed(source[2], finetuned(source, "full").model.state_dict())
    assert VALUES in full and len(full) > 5


def test_lora_trains_only_adapters_and_merges_back_to_the_same_logits(source):
    loop = finetuned(source, "lora")
    state = loop.model.state_dict()
    adapters = {k for k in state if ".lora_" in k}
    base = {k.replace(".base.", "."): v for k, v in state.items() if k not in adapters}
    assert adapters and changed(source[2], base) == set()
    assert {id(p) for p in loop.optimizers.dense.state} == \
        {id(p) for m in loop.model.modules() if isinstance(m, LoRALinear) for p in (m.lora_a, m.lora_b)}
    tokens = torch.tensor([[1, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        adapted = loop.model(tokens)
        merged = merge_lora(loop.model)(tokens)
    assert not any(isinstance(m, LoRALinear) for m in loop.model.modules())
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
