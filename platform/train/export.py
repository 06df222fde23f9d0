"""A training checkpoint as a self-contained model folder: config.json, safetensors shards, tokenizer, card.

`export_checkpoint(CHECKPOINT, OUT)` writes
- `config.json`: the model config (`memlayers.models.pretrained` rebuilds the model from it), the
  tokenizer kind, the run config and step it came from;
- `model-0000i-of-0000n.safetensors` and `model.safetensors.index.json` (the weight map): dense
  tensors in the model's state-dict order, packed into files of at most `max_file_bytes`; each
  value table in a file of its own, assembled from its column shards (written at any memory-parallel
  degree) one block of rows at a time, the shards memory-mapped: the whole table is never in memory,
  and the bytes do not depend on how many shards wrote it;
- the tokenizer's files and a short `README.md` model card.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from memlayers.config_schema import to_dict
from memlayers.models.accounting import account
from memlayers.models.pretrained import CONFIG_FILE, EXPORT_FORMAT, INDEX_FILE
from memlayers.models.transformer import Transformer
from memlayers.platform.data.tokenizers import load_tokenizer
from memlayers.platform.train.checkpoint import state_file
from memlayers.platform.train.loop import plan_run
from memlayers.platform.train.mesh import value_param_names
from memlayers.platform.train.run_config import run_config_from_dict
from memlayers.platform.train.safetensors_writer import Entry, tensor_entry, write_safetensors

MAX_FILE_BYTES = 2 << 30
CHUNK_BYTES = 64 << 20  # rows of a value table assembled at a time


@dataclass(frozen=True)
class Exported:
    directory: Path
    files: list[Path]
    total_bytes: int


def _table_entry(name: str, directory: Path, index: int, like: torch.Tensor) -> Entry:
    """A value table from its column shards (`values-t{index}-p*-r*.pt`), or from the dense state."""
    shards = sorted(directory.glob(f"values-t{index}-p*-r*.pt"))
    if not shards:
        return tensor_entry(name, like)
    opened = [torch.load(p, map_location="cpu", weights_only=True, mmap=True) for p in shards]
    opened.sort(key=lambda s: s["columns"][0])
    columns = [tuple(s["columns"]) for s in opened]
    slots, value_dim = opened[0]["slots"], opened[0]["value_dim"]
    if columns[0][0] != 0 or columns[-1][1] != value_dim or any(a[1] != b[0] for a, b in zip(columns, columns[1:])):
        raise ValueError(f"{directory}: the shards of value table {index} do not cover its columns: {columns}")
    dtype = opened[0]["weight"].dtype
    rows = max(1, CHUNK_BYTES // (value_dim * opened[0]["weight"].element_size()))

    def blocks() -> Iterator[torch.Tensor]:
        for lo in range(0, slots, rows):
            yield torch.cat([s["weight"][lo:lo + rows] for s in opened], dim=1)

    return Entry(name, dtype, (slots, value_dim), blocks)


def _pack(entries: list[Entry], tables: set[str], max_file_bytes: int) -> list[list[Entry]]:
    """Dense entries packed in order into files of at most `max_file_bytes`; each table in its own file."""
    files: list[list[Entry]] = []
    current: list[Entry] = []
    size = 0
    for entry in entries:
        if entry.name in tables:
            files.append([entry])
            continue
        if current and size + entry.nbytes > max_file_bytes:
            files.append(current)
            current, size = [], 0
        current.append(entry)
        size += entry.nbytes
    if current:
        files.append(current)
    return files


def model_card(meta: dict, config: dict, family: str, source: str) -> str:
    """A short README.md: family, sizes, training tokens, where the weights came from."""
    acc = config["accounting"]
    return "\n".join([
        f"# {config['run']['name']}", "",
        f"A memlayers `{family}` language model (base `{config['run']['model']['base']}`), exported from {source}.", "",
        f"- parameters: {acc['total_params']:,} total, {acc['memory_value_params']:,} in memory values, "
        f"{acc['active_params']:,} active per token",
        f"- trained: {meta.get('step', 0):,} steps, {config['training_tokens']:,} tokens",
        f"- tokenizer: {config['tokenizer']}", "",
        "Load with `memlayers.models.load_pretrained(DIR)`; the weights are plain safetensors files.", ""])


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, source: str | None = None,
                      max_file_bytes: int = MAX_FILE_BYTES) -> Exported:
    """Write the export folder of a training checkpoint folder (module docstring)."""
    checkpoint, out = Path(checkpoint), Path(out)
    meta = json.loads((checkpoint / "meta.json").read_text())
    run = run_config_from_dict(meta["run"])
    tokenizer = load_tokenizer(meta["tokenizer"], checkpoint)
    plan = plan_run(run, tokenizer.vocab_size)
    with torch.device("meta"):
        skeleton = Transformer(plan.model)
    names = value_param_names(skeleton, skeleton.value_parameters())
    table_of = {n: i for i, t in enumerate(skeleton.value_tables())
                for n in names if skeleton.get_parameter(n) is t.weight}
    state = torch.load(state_file(checkpoint, 0), map_location="cpu", weights_only=True, mmap=True)["model"]
    entries = []
    for name in skeleton.state_dict():
        if name in table_of:
            entries.append(_table_entry(name, checkpoint, table_of[name], state.get(name)))
        elif name not in state:
            raise ValueError(f"{checkpoint}: the checkpoint has no {name}")
        else:
            entries.append(tensor_entry(name, state[name]))
    out.mkdir(parents=True, exist_ok=True)
    groups = _pack(entries, set(table_of), max_file_bytes)
    files, weight_map, total = [], {}, 0
    for i, group in enumerate(groups):
        path = out / f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        total += write_safetensors(path, group, {"format": "pt"})
        files.append(path)
        weight_map.update({e.name: path.name for e in group})
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config = {"format": EXPORT_FORMAT, "model": to_dict(plan.model), "tokenizer": meta["tokenizer"],
              "run": meta["run"], "step": meta.get("step", 0),
              "training_tokens": int(meta.get("step", 0)) * plan.tokens_per_step,
              "accounting": account(plan.model, run.data.seq_len).as_dict()}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    tokenizer.save(out)
    (out / "README.md").write_text(model_card(meta, config, plan.model.family, source or str(checkpoint)))
    return Exported(out, files, total)
