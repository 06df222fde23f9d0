"""A corpus in a bucket prepared by Ray Data on the real two-node cluster (tests/two_nodes.py: a head without
CPUs, a worker node in its own mount namespace, moto S3, an MLflow server), then trained on, with no node
holding a full copy: shards and manifest land in the bucket, the tasks run on the worker node, a run's
shard cache stays within its bound, and an unreachable bucket is refused by name."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from two_nodes import VENV_BIN, alive_nodes, can_build, two_nodes

from memlayers.platform.cluster.storage import list_files, open_fs, read_text

pytestmark = [pytest.mark.ray, pytest.mark.slow]
CORPUS_FILES = 8
CORPUS_BYTES = 20_500_000    # byte tokenizer: a token per byte, so more than 20M tokens
SHARD_TOKENS = 1_000_000

RUN = """
name: cluster-data
model: {{base: nano, family: dense}}
data: {{source: parquet, path: "{path}", text_field: text, tokenizer: byte, seq_len: 64, val_fraction: 0.01,
        shard_tokens: {shard_tokens}}}
train: {{steps: 6, batch_size: 8, eval_every: 6, eval_batches: 1, qa_eval_items: 0, checkpoint_every: 6,
         log_every: 2}}
resources: {{workers: 1, cpus_per_worker: 1}}
tracking: {{system_metrics: false}}
"""


@pytest.fixture(scope="module")
def cluster():
    reason = can_build()
    if reason:
        pytest.skip(f"two-node cluster: {reason}")
    with two_nodes() as built:
        yield built


@pytest.fixture
def outside(cluster, monkeypatch):
    """This process as a laptop: the S3 endpoint and credentials, nothing else."""
    for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_REGION"):
        monkeypatch.setenv(key, cluster.env[key])
    return cluster


def upload_corpus(bucket_folder: str) -> int:
    """Shakespeare's plays and generated documents from their words in 8 parquet files; returns the bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from memlayers.platform.data.shakespeare import plays

    texts = [text for _, text in plays()]
    words = np.array(sorted(set(" ".join(texts).split())))
    rng = np.random.default_rng(0)
    size = sum(len(t.encode()) for t in texts)
    while size < CORPUS_BYTES:
        doc = " ".join(rng.choice(words, size=1500)) + "\n"
        texts.append(doc)
        size += len(doc.encode())
    fs, root = open_fs(bucket_folder)
    for f in range(CORPUS_FILES):
        table = pa.table({"text": texts[f::CORPUS_FILES], "n": list(range(f, len(texts), CORPUS_FILES))})
        with fs.open_output_stream(f"{root}/part-{f}.parquet") as out:
            pq.write_table(table, out, row_group_size=48)
    return size


def memlayers(cluster, args: list[str], cwd: Path, timeout: float = 400) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run([str(VENV_BIN / "memlayers"), *args], cwd=cwd, env=cluster.env, capture_output=True,
                          text=True, timeout=timeout)


def test_a_bucket_corpus_is_prepared_on_the_worker_node_and_trained_on_through_a_bounded_cache(outside, tmp_path):
    from memlayers.platform.data import DataConfig, TokenLoader
    from memlayers.platform.data.prepare import open_prepared
    from memlayers.platform.tracking.client import client_for, search_runs
    from memlayers.platform.tracking.conventions import role_filter

    cluster = outside
    corpus = "s3://memlayers-test/corpus"
    size = upload_corpus(corpus)
    assert len([f for f in list_files(corpus) if f.endswith(".parquet")]) == CORPUS_FILES
    run_file = tmp_path / "run.yaml"
    run_file.write_text(RUN.format(path=corpus + "/", shard_tokens=SHARD_TOKENS))
    settings = ["--address", cluster.gcs, "--storage", cluster.storage, "--tracking-uri", cluster.tracking]

    started = time.monotonic()
    proc = memlayers(cluster, ["data", "prepare", str(run_file), *settings, "--all"], tmp_path / "elsewhere")
    took = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    written = [line for line in proc.stdout.splitlines() if " written on " in line]
    nodes = {n["raylet"]["nodeId"]: n["raylet"].get("isHeadNode") for n in alive_nodes(cluster)}
    (worker_node,) = [node for node, head in nodes.items() if not head]
    assert written and {line.split(" written on ")[1].split()[0] for line in written} == {worker_node[:12]}

    data_root = f"{cluster.storage}/data"
    (fingerprint,) = {f.split("/")[0] for f in list_files(data_root)}
    manifest = json.loads(read_text(f"{data_root}/{fingerprint}/manifest.json"))
    files = list_files(f"{data_root}/{fingerprint}")
    shards = [f for f in files if f.startswith("shards/")]
    assert manifest["complete"] and len(shards) == len(manifest["shards"]) == len(written) >= 16
    assert manifest["train_tokens"] + manifest["val_tokens"] >= 20_000_000 and manifest["dtype"] == "<u2"
    assert "claim.json" not in files
    print(f"\n{size / 1e6:.1f} MB of text in {CORPUS_FILES} parquet files -> {len(shards)} shards, "
          f"{manifest['train_tokens'] + manifest['val_tokens']:,} tokens, prepared in {took:.1f} s (CLI wall time)")
    (data_run,) = search_runs(cluster.tracking, "cluster-data", role_filter("data"))
    assert data_run.info.status == "FINISHED"
    assert [a.path for a in client_for(cluster.tracking).list_artifacts(data_run.info.run_id)] == ["manifest.json"]

    proc = memlayers(cluster, ["train", str(run_file), *settings, "--workdir", str(cluster.root / "scratch")],
                     tmp_path / "elsewhere")
    assert proc.returncode == 0 and "FINISHED" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run,) = search_runs(cluster.tracking, "cluster-data", role_filter("run"))
    cache = json.loads(run.data.tags["memlayers.data_cache"])  # measured by the worker on the worker node
    assert 1 <= cache["downloads"] and cache["peak_bytes"] <= cache["limit_bytes"] < cache["set_bytes"] / 3
    assert list_files(data_root) == [f"{fingerprint}/{f}" for f in files]  # training wrote nothing into the set

    # a loader over the whole set from outside the cluster: shard after shard, never more than the bound
    cfg = DataConfig(source="parquet", path=corpus + "/", text_field="text", tokenizer="byte", seq_len=64,
                     val_fraction=0.01, shard_tokens=SHARD_TOKENS)
    data = open_prepared(cfg, data_root, None, tmp_path / "cache", manifest)
    loader = TokenLoader(data.train_ids, 64, 2048, seed=1)
    for _ in range(60):
        loader.next_batch()
    shard_cache = data.train_ids.cache
    on_disk = sum(p.stat().st_size for p in (tmp_path / "cache").rglob("*.tok"))
    assert shard_cache.downloads >= 6 and on_disk <= shard_cache.limit_bytes
    assert shard_cache.peak_bytes <= shard_cache.limit_bytes < sum(shard_cache.sizes.values()) / 3


def test_an_unreachable_bucket_is_refused_naming_storage(outside, tmp_path):
    run_file = tmp_path / "run.yaml"
    run_file.write_text(RUN.format(path="s3://memlayers-test/corpus/", shard_tokens=SHARD_TOKENS))
    proc = memlayers(outside, ["data", "prepare", str(run_file), "--storage", "s3://no-such-bucket/studies",
                               "--no-ray", "--workdir", str(tmp_path / "wd")], tmp_path / "elsewhere")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert ": storage: bucket 'no-such-bucket'" in line, line
    assert not (tmp_path / "wd").exists()
