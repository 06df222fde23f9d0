"""Prepared sets of token shards: bit for bit the single-process reference, resume after a kill, one
writer per set, extension by need, bad sources named, and the loader's order across shards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from memlayers.platform.data import ConfigError, DataConfig, TokenLoader
from memlayers.platform.data.build import prepare_set
from memlayers.platform.data.prepare import open_prepared, reference_streams
from memlayers.platform.data.shards import set_uri

WORDS = "to be or not that is the question whether tis nobler in mind suffer slings arrows outrageous fortune".split()


def documents(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 60)))) + f" ({i}) ✓" for i in range(n)]


def write_corpus(folder: Path, files: int = 3, docs: int = 120, row_group: int = 25) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        texts = documents(docs, seed=f)
        texts[3] = None  # a missing text is an empty document, as the single-process reader reads it
        pq.write_table(pa.table({"body": texts}), folder / f"part{f}.parquet", row_group_size=row_group)
    return folder


def stream(data_ids) -> np.ndarray:
    return np.asarray(data_ids, dtype=np.int64)


def parquet_cfg(folder: Path, **changes) -> DataConfig:
    return DataConfig(source="parquet", path=str(folder), text_field="body", tokenizer="bpe", vocab_size=300,
                      val_fraction=0.1, shard_tokens=1500, **changes)


def test_shards_equal_the_single_process_reference_bit_for_bit(tmp_path, ray_local):
    folder = write_corpus(tmp_path / "corpus")
    cfg = parquet_cfg(folder)
    tokenizer, ref_train, ref_val = reference_streams(cfg, tmp_path / "reference")
    manifest = prepare_set(cfg, str(tmp_path / "data"), out=lambda _: None)  # Ray is up: Ray Data tasks write
    assert len(manifest["shards"]) >= 6 and manifest["complete"] and manifest["dtype"] == "<u2"
    data = open_prepared(cfg, str(tmp_path / "data"), None, tmp_path / "cache", manifest)
    assert data.tokenizer.hf.to_str() == tokenizer.hf.to_str()
    assert np.array_equal(stream(data.train_ids), ref_train) and np.array_equal(stream(data.val_ids), ref_val)
    assert len(ref_val) > 0 and data.meta["train_documents"] + data.meta["val_documents"] == 360
    # a run reads, shard by shard, the batches the same loader cuts from the reference's tokens
    ref = ref_train.view(Spanned)
    ref.spans = data.train_ids.spans
    ours, theirs = TokenLoader(data.train_ids, 16, 8, seed=3), TokenLoader(ref, 16, 8, seed=3)
    for _ in range(40):
        for a, b in zip(ours.next_batch(), theirs.next_batch()):
            assert torch.equal(a, b)


class Spanned(np.ndarray):
    """A plain array that says where the shards begin (what a ShardStream tells its loader)."""


def test_text_and_facts_sets_equal_the_reference(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i, text in enumerate(["first\r\nline two\n", "solo", "third\n\nwith a blank line", "x" * 50 + "\n"]):
        (folder / f"t{i}.txt").write_text(text, newline="")
    for cfg in (DataConfig(source="text", path=str(folder), val_fraction=0.3, shard_tokens=40),
                DataConfig.from_dict({"facts": {"people": 30, "renderings": 2}, "shard_tokens": 300})):
        _, ref_train, ref_val = reference_streams(cfg, tmp_path / cfg.source)
        manifest = prepare_set(cfg, str(tmp_path / "data"), out=lambda _: None)
        data = open_prepared(cfg, str(tmp_path / "data"), None, tmp_path / "cache", manifest)
        assert len(manifest["shards"]) >= 2, cfg.source
        assert np.array_equal(stream(data.train_ids), ref_train) and np.array_equal(stream(data.val_ids), ref_val)


PREPARE = textwrap.dedent("""
    import sys
    from memlayers.platform.data import DataConfig
    from memlayers.platform.data.build import prepare_set
    cfg = DataConfig(source="parquet", path=sys.argv[1], text_field="body", tokenizer="bpe", vocab_size=300,
                     val_fraction=0.1, shard_tokens=400)
    prepare_set(cfg, sys.argv[2], out=lambda line: print(line, flush=True))
""")


def _prepare(corpus: Path, root: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", PREPARE, str(corpus), str(root)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)


def _written(lines: list[str]) -> list[int]:
    return [int(line.split("shard ")[1].split()[0]) for line in lines if " written" in line]


def _shard_files(set_root: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (set_root / "shards").glob("*.tok")}


def test_a_killed_preparation_resumes_writing_only_the_missing_shards(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", files=4, docs=200)
    root = tmp_path / "data"
    first = _prepare(corpus, root)
    seen: list[str] = []
    for line in first.stdout:
        seen.append(line)
        if len(_written(seen)) >= 3:
            os.killpg(first.pid, signal.SIGKILL)
            break
    first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL, "".join(seen)
    (set_root,) = [p for p in root.iterdir() if p.is_dir()]
    before = _shard_files(set_root)
    assert not (set_root / "manifest.json").exists() and len(before) >= 3

    second = _prepare(corpus, root)
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out
    manifest = json.loads((set_root / "manifest.json").read_text())
    total = len(manifest["shards"])
    rewritten = _written(out.splitlines())
    print(f"\nkilled after {len(before)} of {total} shards; the restart wrote {len(rewritten)}")
    assert len(before) < total and len(rewritten) == total - len(before)
    assert sorted(rewritten) == sorted(set(range(total)) - {int(n[:5]) for n in before})
    after = _shard_files(set_root)
    assert all(after[name] == stamp for name, stamp in before.items())  # the earlier shards were not touched
    assert not list((set_root / "shards").glob(".*tmp*"))


def test_two_preparations_of_one_set_write_each_shard_once(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", files=2, docs=150)
    root = tmp_path / "data"
    procs = [_prepare(corpus, root) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    (set_root,) = [p for p in root.iterdir() if p.is_dir()]
    total = len(json.loads((set_root / "manifest.json").read_text())["shards"])
    written = [w for out in outputs for w in _written(out.splitlines())]
    assert sorted(written) == list(range(total))  # every shard written by exactly one of them
    assert any("waiting" in out for out in outputs)


def test_preparation_stops_at_the_need_and_a_larger_need_extends_the_set(tmp_path):
    cfg = parquet_cfg(write_corpus(tmp_path / "corpus", files=3, docs=200))
    root = str(tmp_path / "data")
    small = prepare_set(cfg, root, need=2000, out=lambda _: None)
    assert not small["complete"] and 2000 <= small["train_tokens"] < 2000 + 3 * cfg.shard_tokens
    set_root = Path(set_uri(root, small["fingerprint"]))
    before = _shard_files(set_root)
    lines: list[str] = []
    full = prepare_set(cfg, root, need=None, out=lines.append)
    assert full["complete"] and full["fingerprint"] == small["fingerprint"]
    assert len(_written(lines)) == len(full["shards"]) - len(before)
    assert all(_shard_files(set_root)[n] == s for n, s in before.items())
    # a run needing 2000 tokens reads the same short prefix from the larger set
    data = open_prepared(cfg, root, 2000, tmp_path / "cache", full)
    assert len(data.train_ids) == small["train_tokens"]


def test_bad_sources_name_their_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pytest.raises(ConfigError, match=r"^data\.path: no parquet files match"):
        prepare_set(DataConfig(source="parquet", path=str(tmp_path / "none*.parquet")), str(tmp_path / "d"))
    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "x.parquet")
    with pytest.raises(ConfigError, match=r"^data\.text_field: column 'text' not in .*columns: body"):
        prepare_set(DataConfig(source="parquet", path=str(tmp_path / "x.parquet")), str(tmp_path / "d"))
    assert not (tmp_path / "d").exists()  # nothing written


def positional_stream(tmp_path: Path, lengths: list[int]):
    """A set whose token i is i (int32): a batch's first column / T names its sequences."""
    from memlayers.platform.data.shard_loader import Segment, ShardCache, ShardStream
    from memlayers.platform.data.shards import write_shard

    root, at, infos = str(tmp_path / "positional"), 0, []
    for k, n in enumerate(lengths):
        infos.append(write_shard(root, k, np.arange(at, at + n), np.zeros(0), (1, 0), np.dtype("<i4")))
        at += n
    return ShardStream(ShardCache(root, np.dtype("<i4"), infos, None), [Segment(i.index, 0, 0, i.train_tokens)
                                                                         for i in infos])


def test_resume_continues_the_order_across_shards_at_another_world_size(tmp_path):
    T = 8
    ids = positional_stream(tmp_path, [300, 170, 401, 90, 250, 333, 120, 280, 210, 360, 190, 230])
    n_seq = (len(ids) - 1) // T

    def run(loaders: list[TokenLoader], steps: int) -> list[int]:
        return [int(s) // T for _ in range(steps) for loader in loaders for s in loader.next_batch()[0][:, 0]]

    two = [TokenLoader(ids, T, 6, rank=r, world_size=2, seed=5) for r in range(2)]
    seen = run(two, 7)
    state = json.loads(json.dumps(two[0].state_dict()))  # what a checkpoint keeps
    expected = run(two, 30)  # crosses into the next epoch
    for world in (1, 3, 4):
        loaders = [TokenLoader(ids, T, 12 // world, rank=r, world_size=world, seed=5) for r in range(world)]
        for loader in loaders:
            loader.load_state_dict(state)
        assert run(loaders, 30) == expected, world
    epoch = (seen + expected)[:n_seq]
    assert sorted(epoch) == list(range(n_seq))  # none twice, none skipped
    shard_of = np.searchsorted(ids.spans, np.array(epoch) * T, side="right")
    assert (np.diff(shard_of) != 0).sum() == len(ids.spans) - 1  # one shard's sequences after another
    assert ids.cache.downloads == 0  # a set on a local disk is read in place, never copied
    assert ids.cache.peak_bytes <= ids.cache.limit_bytes < sum(ids.cache.sizes.values())  # never all mapped at once


RUN = """
name: data-cli
model: {{base: nano, family: dense}}
data: {{source: parquet, path: "{path}", text_field: {field}, tokenizer: byte, seq_len: 16, shard_tokens: 3000}}
train: {{steps: 4, batch_size: 4}}
"""


def _cli(args: list[str], capsys) -> tuple[int, str, str]:
    from memlayers.platform.cli.main import main

    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_data_prepare_command_records_a_data_run_and_refuses_bad_sources(tmp_path, capsys):
    import yaml

    from memlayers.platform.data.tracked import data_status
    from memlayers.platform.tracking.client import client_for, search_runs
    from memlayers.platform.tracking.conventions import role_filter

    corpus = write_corpus(tmp_path / "corpus", files=2, docs=100)
    bad = {"missing": (str(tmp_path / "nothing" / "*.parquet"), "body", "data.path"),
           "no-field": (str(corpus), "text", "data.text_field")}
    for name, (path, field, named) in bad.items():
        file = tmp_path / f"{name}.yaml"
        file.write_text(RUN.format(path=path, field=field))
        code, out, err = _cli(["data", "prepare", str(file), "--no-ray", "--workdir", str(tmp_path / name)], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and f": {named}: " in err, err
        assert not (tmp_path / name).exists()  # nothing started, nothing written
    study = yaml.safe_load((Path(__file__).parents[1] / "studies" / "smoke.yaml").read_text())
    study["data"], study["tokenizer"] = {"source": "parquet", "path": str(corpus), "text_field": "text"}, "byte"
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    code, out, err = _cli(["study", "run", str(tmp_path / "study.yaml"), "--workdir", str(tmp_path / "sw")], capsys)
    assert code == 2 and "data.text_field: column 'text' not in" in err.strip().splitlines()[-1], err
    assert not list((tmp_path / "sw").glob("cells/*"))  # no cell started

    good = tmp_path / "good.yaml"
    good.write_text(RUN.format(path=corpus, field="body"))
    workdir = tmp_path / "wd"
    code, out, err = _cli(["data", "prepare", str(good), "--no-ray", "--all", "--workdir", str(workdir)], capsys)
    assert code == 0, err
    assert " written" in out and "data: fingerprint parquet-byte-" in out
    uri = f"sqlite:///{workdir}/mlflow.db"
    (run,) = search_runs(uri, "data-cli", role_filter("data"))
    assert run.info.status == "FINISHED" and run.data.metrics["shards_written"] >= 3
    assert [a.path for a in client_for(uri).list_artifacts(run.info.run_id)] == ["manifest.json"]
    assert data_status(uri, "data-cli").startswith("data: prepared parquet-byte-")


def test_a_run_resumed_from_its_checkpoint_at_another_world_size_reads_the_next_sequences(tmp_path):
    from memlayers.platform.train.loop import RunLoop
    from memlayers.platform.train.run_config import run_config_from_dict

    corpus = write_corpus(tmp_path / "corpus", files=2, docs=150)
    cfg = run_config_from_dict({"name": "resume", "model": {"base": "nano", "family": "dense"},
                                "data": {"source": "parquet", "path": str(corpus), "text_field": "body",
                                         "tokenizer": "byte", "seq_len": 16, "shard_tokens": 3000},
                                "train": {"steps": 12, "batch_size": 8}})
    manifest = prepare_set(cfg.data, str(tmp_path / "data"), out=lambda _: None)
    data = open_prepared(cfg.data, str(tmp_path / "data"), None, tmp_path / "cache", manifest)
    assert len(data.train_ids.spans) >= 4

    def recorded(loop: RunLoop) -> list[torch.Tensor]:
        seen: list[torch.Tensor] = []
        take = loop.loader.next_batch
        loop.loader.next_batch = lambda: seen.append(take()[0]) or (seen[-1], seen[-1])
        return seen

    first = RunLoop(cfg, data)
    before = recorded(first)
    for _ in range(3):
        first.train_step()
    first.save(tmp_path / "checkpoint")
    for _ in range(4):
        first.train_step()
    ranks = [RunLoop(cfg, data, rank=r, world_size=2) for r in range(2)]
    after = [recorded(loop) for loop in ranks]
    for loop in ranks:
        loop.load(tmp_path / "checkpoint")
    for _ in range(4):
        for loop in ranks:
            loop.loader.next_batch()
    continued = torch.cat([torch.cat([after[0][i], after[1][i]]) for i in range(4)])
    assert torch.equal(continued, torch.cat(before[3:]))  # the next sequences, in order, none twice or skipped
    assert len({tuple(row.tolist()) for row in torch.cat(before)}) == len(torch.cat(before))
