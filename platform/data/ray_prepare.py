"""The parallel part of a preparation: parts -> published shards, as a Ray Data pipeline.

`write_parts(cfg, set_root, parts, dtype)` yields `(ShardInfo, node id)` as shards are published.
With Ray initialised it is `from_items(parts) -> map_batches(one part per call)`: each task reads
its own part from storage (the read runs inside the map stage: on 2 CPUs a separate read stage
starved by a CPU-holding actor pool hung, ../shared/DESIGN.md §6), tokenizes it and publishes its
shard, so no text or token passes through the driver and the tasks land on whichever nodes have
CPUs. Each worker process loads the set's tokenizer once and keeps it. Without Ray (or for one
part) the same function runs here, one part after another.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import numpy as np

from memlayers.platform.data.config import DataConfig
from memlayers.platform.data.parts import Part, encode_part, part_pieces
from memlayers.platform.data.shards import ShardInfo, write_shard
from memlayers.platform.data.sources import hashed_split
from memlayers.platform.data.stored_tokenizer import fetch_tokenizer
from memlayers.platform.data.tokenizers import Tokenizer

_TOKENIZERS: dict[str, Tokenizer] = {}   # per worker process: set root -> its tokenizer
INFO_FIELDS = ("index", "train_tokens", "val_tokens", "train_documents", "val_documents")


def _set_tokenizer(kind: str, set_root: str) -> Tokenizer:
    if set_root not in _TOKENIZERS:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = fetch_tokenizer(kind, set_root, Path(tmp))
        if tokenizer is None:
            raise FileNotFoundError(f"data: the tokenizer of {set_root} is not stored")
        _TOKENIZERS[set_root] = tokenizer
    return _TOKENIZERS[set_root]


def write_part(cfg: DataConfig, set_root: str, part: Part, dtype: np.dtype) -> ShardInfo:
    """Tokenize one part and publish its shard."""
    tokenizer = _set_tokenizer(cfg.tokenizer, set_root)
    train, val, documents = encode_part(part_pieces(cfg, part), tokenizer, hashed_split(cfg.seed, cfg.val_fraction))
    return write_shard(set_root, part.index, train, val, documents, dtype)


def _write_batch(batch: dict, cfg: dict, set_root: str, dtype: str) -> dict:
    import ray  # deferred: this runs in a Ray task

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one CPU per task: the task count is the parallelism
    data_cfg = DataConfig.from_dict(cfg)
    infos = [write_part(data_cfg, set_root, Part(**{k: tuple(v) if isinstance(v, list) else v
                                                   for k, v in json.loads(p).items()}), np.dtype(dtype))
             for p in batch["part"]]
    node = ray.get_runtime_context().get_node_id()
    return {**{k: [getattr(i, k) for i in infos] for k in INFO_FIELDS}, "node": [node] * len(infos)}


def write_parts(cfg: DataConfig, set_root: str, parts: list[Part], dtype: np.dtype) -> Iterator[tuple[ShardInfo, str]]:
    """Publish the shards of `parts` (see the module docstring)."""
    import ray  # deferred: ray is heavy and only this path needs it

    if not ray.is_initialized() or len(parts) < 2:
        for part in parts:
            yield write_part(cfg, set_root, part, dtype), ""
        return
    import ray.data  # deferred: ray is heavy and only this path needs it

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False       # the driver prints one line per shard instead
    context.print_on_execution_start = False
    items = [{"part": json.dumps(asdict(p))} for p in parts]
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _write_batch, batch_size=1, num_cpus=1, zero_copy_batch=True,
        fn_kwargs={"cfg": cfg.to_dict(), "set_root": set_root, "dtype": dtype.str})
    for row in dataset.iter_rows():
        yield ShardInfo(*(int(row[k]) for k in INFO_FIELDS)), str(row["node"])
