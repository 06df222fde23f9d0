"""The data pipeline: corpora -> tokenizer -> cached token streams -> packed, sharded batches.

    cfg = DataConfig.from_dict(run["data"], path="data")      # config.py
    data = prepare_data(cfg, cache_dir)                        # prepare.py: a local set, int32 arrays
    prepare_set(cfg, storage_data_root, need)                  # build.py: shards in storage (Ray Data)
    data = open_prepared(cfg, storage_data_root, need, cache)  # prepare.py: streams via a shard cache
    loader = TokenLoader(data.train_ids, cfg.seq_len, batch_size, rank=r, world_size=w, seed=s)
    inputs_BT, targets_BT = loader.next_batch()                # loader.py; state_dict() to resume

Sources: synthetic facts (facts.py, with a QA split in qa.py), Shakespeare (shakespeare.py),
local text/JSONL/parquet and hub datasets (sources.py). Tokenizers: tokenizers.py.
Names are imported lazily so that `import memlayers.platform.data` does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ConfigError": "memlayers.platform.data.config",
    "DataConfig": "memlayers.platform.data.config",
    "FactsConfig": "memlayers.platform.data.config",
    "PreparedData": "memlayers.platform.data.prepare",
    "prepare_data": "memlayers.platform.data.prepare",
    "fingerprint": "memlayers.platform.data.identity",
    "open_prepared": "memlayers.platform.data.prepare",
    "prepare_set": "memlayers.platform.data.build",
    "TokenLoader": "memlayers.platform.data.loader",
    "QAItem": "memlayers.platform.data.qa",
    "FACTS_VERSION": "memlayers.platform.data.attributes",
    "DATA_VERSION": "memlayers.platform.data.identity",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
