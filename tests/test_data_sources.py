"""Local files through `datasets`, the hub offline, Shakespeare, the BPE cache, concurrent preparers."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import numpy as np
import pytest

from memlayers.platform.data import ConfigError, DataConfig, prepare_data
from memlayers.platform.data.shakespeare import markdown_to_text, split_plays

# HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 come from tests/conftest.py

DOCS = [f"document {i}: the quick brown fox {'jumps ' * (i % 5)}over the lazy dog. ünïcode ✓" for i in range(60)]


def split_docs(data) -> list[str]:
    """Decode each EOS-terminated document of train + val."""
    out = []
    for ids in (data.train_ids, data.val_ids):
        ids = np.asarray(ids)
        ends = np.flatnonzero(ids == data.tokenizer.eos_id)
        start = 0
        for end in ends:
            out.append(data.tokenizer.decode(ids[start:end]))
            start = end + 1
    return out


def write_jsonl(path: Path) -> Path:
    path.write_text("".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(DOCS)))
    return path


def write_parquet(path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": DOCS, "n": list(range(len(DOCS)))}), path, row_group_size=16)
    return path


@pytest.mark.parametrize("kind, writer", [("jsonl", write_jsonl), ("parquet", write_parquet)])
@pytest.mark.parametrize("streaming", [False, True])
def test_rows_round_trip_through_datasets(tmp_path, kind, writer, streaming):
    path = writer(tmp_path / f"docs.{kind}")
    cfg = DataConfig(source=kind, path=str(path), text_field="body", val_fraction=0.2, streaming=streaming)
    data = prepare_data(cfg, tmp_path / "cache")
    assert sorted(split_docs(data)) == sorted(DOCS)
    assert 0 < data.meta["val_documents"] < len(DOCS) and data.meta["val_split"] == "documents"
    assert data.train_ids.dtype == np.int32 and data.tokenizer.vocab_size == 258
    assert data.fingerprint.startswith(f"{kind}-byte-")


def test_streaming_gives_the_same_tokens_and_fingerprint(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl")
    base = DataConfig(source="jsonl", path=str(path), text_field="body")
    a = prepare_data(base, tmp_path / "a")
    b = prepare_data(base.replace(streaming=True), tmp_path / "b")
    assert a.fingerprint == b.fingerprint
    assert np.array_equal(a.train_ids, b.train_ids) and np.array_equal(a.val_ids, b.val_ids)


def test_text_files_glob_and_directory(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    texts = ["first file\nline two\n", "second file\n\nwith a blank line\n", "third\n"]
    for i, text in enumerate(texts):
        (folder / f"part{i}.txt").write_text(text)
    (folder / "ignored.csv").write_text("not, text")
    by_dir = prepare_data(DataConfig(source="text", path=str(folder), val_fraction=0.0), tmp_path / "c")
    assert split_docs(by_dir) == texts  # one document per file, line breaks kept, sorted order
    by_glob = prepare_data(DataConfig(source="text", path=str(folder / "part*.txt"), val_fraction=0.0),
                           tmp_path / "c")
    assert by_glob.fingerprint == by_dir.fingerprint
    word = prepare_data(DataConfig(source="text", path=str(folder), tokenizer="word", val_fraction=0.0),
                        tmp_path / "c")
    assert word.tokenizer.decode(word.train_ids) == " ".join(" ".join(texts).split())


def test_single_text_file_falls_back_to_a_tail_split(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("".join(f"line {i}\n" for i in range(200)))
    data = prepare_data(DataConfig(source="text", path=str(path), val_fraction=0.1), tmp_path / "c")
    assert data.meta["val_split"] == "tail"
    total = len(data.train_ids) + len(data.val_ids)
    assert len(data.val_ids) == int(np.ceil(0.1 * total))
    text = data.tokenizer.decode(np.concatenate([data.train_ids, data.val_ids]))
    assert text == path.read_text()


def test_changed_file_changes_the_fingerprint(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("hello world\n")
    cfg = DataConfig(source="text", path=str(path))
    before = prepare_data(cfg, tmp_path / "c").fingerprint
    path.write_text("hello there\n")
    assert prepare_data(cfg, tmp_path / "c").fingerprint != before


def test_max_tokens_truncates_the_training_stream(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl")
    data = prepare_data(DataConfig(source="jsonl", path=str(path), text_field="body", max_tokens=500),
                        tmp_path / "c")
    assert len(data.train_ids) == 500


def test_hub_name_fails_fast_and_clearly_offline(tmp_path):
    cfg = DataConfig(source="hub", name="memlayers-test/no-such-dataset")
    start = time.monotonic()
    with pytest.raises(ConfigError) as info:
        prepare_data(cfg, tmp_path)
    message = str(info.value)
    assert message.startswith("data.name: cannot load 'memlayers-test/no-such-dataset' from the Hugging Face hub "
                              "(offline? HF_HUB_OFFLINE=1): ")
    assert time.monotonic() - start < 60
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("hub-")]  # nothing published


def test_bad_paths_and_columns_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"^data\.path: no jsonl files match"):
        prepare_data(DataConfig(source="jsonl", path=str(tmp_path / "missing*.jsonl")), tmp_path)
    path = write_jsonl(tmp_path / "docs.jsonl")
    with pytest.raises(ConfigError, match=r"^data\.text_field: column 'text' not in .*columns: body, id"):
        prepare_data(DataConfig(source="jsonl", path=str(path)), tmp_path / "c")


def test_bpe_is_trained_cached_and_reloaded(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl")
    cfg = DataConfig(source="jsonl", path=str(path), text_field="body", tokenizer="bpe", vocab_size=300)
    first = prepare_data(cfg, tmp_path / "c")
    saved = first.directory / "tokenizer.json"
    assert saved.exists() and first.tokenizer.vocab_size == 300
    stamp = saved.stat().st_mtime_ns
    again = prepare_data(cfg, tmp_path / "c")
    assert again.directory == first.directory and saved.stat().st_mtime_ns == stamp  # not rebuilt
    assert type(again.tokenizer) is type(first.tokenizer)
    for text in DOCS[:5] + ["unseen wörds are still encodable ✓"]:
        ids = again.tokenizer.encode(text)
        assert ids == first.tokenizer.encode(text) and again.tokenizer.decode(ids) == text
    assert len(first.tokenizer.encode(DOCS[0])) < len(DOCS[0].encode())  # merges were learned
    assert np.array_equal(again.train_ids, first.train_ids)
    assert sorted(split_docs(again)) == sorted(DOCS)
    retrained = prepare_data(cfg, tmp_path / "fresh")  # training is deterministic
    assert retrained.fingerprint == first.fingerprint
    assert (retrained.directory / "tokenizer.json").read_text() == saved.read_text()


def _prepare_in_process(cache: str) -> tuple[str, list[int]]:
    cfg = DataConfig.from_dict({"tokenizer": "bpe", "vocab_size": 400,
                                "facts": {"people": 50, "values_per_attribute": 10, "renderings": 3}})
    data = prepare_data(cfg, Path(cache))
    return data.fingerprint, np.asarray(data.train_ids).tolist()


def test_concurrent_preparers_share_one_complete_cache_entry(tmp_path):
    cache = tmp_path / "cache"
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        results = pool.map(_prepare_in_process, [str(cache)] * 3)
    assert len({fp for fp, _ in results}) == 1
    assert all(ids == results[0][1] for _, ids in results)
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".")] == [results[0][0]]
    assert not list(cache.glob(".*.tmp-*"))


def test_shakespeare_plays_split_by_play(tmp_path):
    data = prepare_data(DataConfig(source="shakespeare", val_fraction=0.05), tmp_path)
    assert data.meta["train_documents"] + data.meta["val_documents"] == 38
    assert 1 <= data.meta["val_documents"] <= 4
    assert 0.05 <= len(data.val_ids) / (len(data.train_ids) + len(data.val_ids)) < 0.2
    head = data.tokenizer.decode(data.train_ids[:2000])
    assert "**" not in head and "ACT I" in head and ":\n" in head
    assert data.qa == []


def test_play_split_is_deterministic_and_disjoint():
    plays = [(f"p{i}", "x" * (100 + i)) for i in range(38)]
    train, val = split_plays(plays, 0.1, seed=0)
    assert (train, val) == split_plays(plays, 0.1, seed=0)
    assert val != split_plays(plays, 0.1, seed=1)[1]
    assert not {n for n, _ in train} & {n for n, _ in val} and len(train) + len(val) == 38
    assert split_plays(plays, 0.0, seed=0)[1] == []


def test_markdown_to_text():
    md = "# Title\n\n## ACT I\n\n_Enter HAMLET_\n\n**HAMLET**  \nTo be, or not\\[ to be\\].  \n"
    assert markdown_to_text(md) == "Title\n\nACT I\n\nEnter HAMLET\n\nHAMLET:\nTo be, or not[ to be].\n"
