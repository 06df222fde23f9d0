"""A finetuning study's cells: source checkpoint x method x seed, and where each source comes from.

A source is resolved (`resolve_source`) into the pretrained cell's model spec, its data config
(tokenizer, held-out text and old QA pairs come from it) and, once it exists, its final checkpoint
folder: a cell of another study (that study's file, beside this one in its folder or a path; its
cell matched by selector and seed; its run in that study's store), an MLflow run id (its
`checkpoint` tag) or a checkpoint folder (its meta.json holds the run config). A study source whose
cell has not finished yet is pretrained first (`pretrain_sources`), as a study of that one cell:
the cell's id does not depend on the rest of its grid, so the source study reuses it later.

Memory methods skip sources without value tables. A cell's id hashes the source's identity (not
its folder, unknown before pretraining), the method, the finetuning settings, seed and budget.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from memlayers.config_schema import ConfigError, to_dict
from memlayers.models.config import MEMORY_FAMILIES
from memlayers.models.presets import memory_size_name
from memlayers.platform.data.config import DataConfig
from memlayers.platform.data.vocab import vocab_size_of
from memlayers.platform.finetune.config import MEMORY_METHODS, FinetuneRun, SourceConfig
from memlayers.platform.study.cells import Cell, _account, parse_memory_size
from memlayers.platform.study.progress import cell_runs, latest
from memlayers.platform.study.schema import Study, StudyError
from memlayers.platform.tracking.client import client_for
from memlayers.platform.tracking.conventions import CHECKPOINT_TAG, cell_run_name
from memlayers.platform.train.run_config import ModelSpec, run_config_from_dict


@dataclass
class Source:
    model: ModelSpec
    data: DataConfig
    identity: str                       # what the finetuning cells' ids hash
    checkpoint: Optional[str]           # the final checkpoint folder, None until it exists
    study: Optional[Study] = None       # a study source: that study narrowed to the source cell
    cell: Optional[Cell] = None


def source_study_file(study: Study, name: str) -> Path:
    """A source study's file: a path, or `<name>.yaml` beside this study's file (else in studies/)."""
    if name.endswith((".yaml", ".yml")):
        return Path(name).expanduser()
    return (study.file.parent if study.file else Path("studies")) / f"{name}.yaml"


def narrowed(source: Study, cell: Cell) -> Study:
    """`source` reduced to the one grid point and seed of `cell` (same cell id, nothing else to run)."""
    own = source.grid.overrides.get(cell.family)
    overrides = {cell.family: dataclasses.replace(own, bases=None, memory_sizes=None, experts=None)} if own else {}
    grid = dataclasses.replace(source.grid, bases=[cell.base], families=[cell.family],
                               memory_sizes=[cell.memory_slots] if cell.memory_slots else [],
                               experts=[cell.experts] if cell.experts else [], overrides=overrides)
    return dataclasses.replace(source, grid=grid, seeds=[cell.seed], report=False,
                               fit=dataclasses.replace(source.fit, enabled=False))


def _checkpoint_of_run(uri: str, run_id: str, path: str) -> str:
    try:
        tags = client_for(uri).get_run(run_id).data.tags
    except Exception as error:
        raise ConfigError(path, f"no run {run_id} in {uri} ({type(error).__name__})") from None
    folder = tags.get(CHECKPOINT_TAG)
    if not folder or not Path(folder).is_dir():
        raise ConfigError(path, f"run {run_id} has no final checkpoint folder on this machine (tag {CHECKPOINT_TAG})")
    return folder


def _from_folder(folder: str, identity: str, path: str) -> Source:
    meta_file = Path(folder) / "meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    if "run" not in meta:
        raise ConfigError(path, f"{folder}: meta.json holds no run config")
    run = run_config_from_dict(meta["run"])
    return Source(run.model, run.data, identity, str(Path(folder).resolve()))


def resolve_source(study: Study, src: SourceConfig, path: str) -> Source:
    """The source's model, data and (when it exists) checkpoint folder; ConfigError naming `path`."""
    if src.checkpoint is not None:
        return _from_folder(src.checkpoint, src.label(), f"{path}.checkpoint")
    if src.run_id is not None:
        uri = src.tracking_uri or study.tracking_uri()
        return _from_folder(_checkpoint_of_run(uri, src.run_id, f"{path}.run_id"), src.label(), f"{path}.run_id")
    from memlayers.platform.study.cells import expand  # deferred: study.cells hands finetuning studies to this module
    from memlayers.platform.study.validate import load_study  # deferred: the reader imports the study schema
    file = source_study_file(study, src.study)
    if not file.is_file():
        raise ConfigError(f"{path}.study", f"no study file {file}")
    source = load_study(file)
    wanted = {k: parse_memory_size(v) if k == "memory_slots" and isinstance(v, str) else v for k, v in src.cell.items()}
    matches = [c for c in expand(source) if c.seed == src.seed and
               all(getattr(c, k, None) == v for k, v in wanted.items())]
    if len(matches) != 1:
        raise ConfigError(f"{path}.cell", f"matches {len(matches)} cells of study {source.name} at seed {src.seed} "
                                          "(name family, base and memory_slots or experts until one is left)")
    cell = matches[0]
    try:
        run = latest(cell_runs(source.tracking_uri(), source.name).get(cell.id, []))
    except Exception:  # the source study has no store yet
        run = None
    folder = run.tags.get(CHECKPOINT_TAG) if run is not None and run.status == "FINISHED" else None
    return Source(cell.model, cell.data, f"{source.name}:{cell.id}", folder, narrowed(source, cell), cell)


def pretrain_sources(study: Study, run: Callable[[Study], object], out: Callable[[str], None]) -> None:
    """Train every study source's cell that has not finished (each as a study of that one cell)."""
    for i, src in enumerate(study.finetune.sources):
        if src.study is None:
            continue
        source = resolve_source(study, src, f"finetune.sources[{i}]")
        if source.checkpoint is None:
            out(f"study {study.name}: pretraining its source {source.cell.name} of study {source.study.name}")
            run(source.study)
            if resolve_source(study, src, f"finetune.sources[{i}]").checkpoint is None:
                raise StudyError([ConfigError(f"finetune.sources[{i}]", f"the source cell {source.cell.name} of "
                                                                       f"study {source.study.name} did not finish")])


def expand_finetune(study: Study, vocab_size: int | None = None, cache_dir: Path | None = None) -> list[Cell]:
    """Every finetuning cell of `study`: sources x methods x seeds, accounted; StudyError on a bad source."""
    ft, cells, errors = study.finetune, [], []
    for i, src in enumerate(ft.sources):
        try:
            source = resolve_source(study, src, f"finetune.sources[{i}]")
        except ConfigError as error:
            errors.append(error)
            continue
        slots = parse_memory_size(source.model.memory_slots) if source.model.memory_slots is not None else None
        has_memory = source.model.family in MEMORY_FAMILIES
        if has_memory and "sparse_memory" in ft.methods and slots is not None and ft.top_t > slots:
            errors.append(ConfigError("finetune.top_t", f"{ft.top_t} is more than the {slots} slots of source "
                                                        f"{src.label()}"))
            continue
        vocab = vocab_size or vocab_size_of(source.data, cache_dir)
        for method in ft.methods:
            if method in MEMORY_METHODS and not has_memory:
                continue
            for seed in study.seeds:
                cells.append(_cell(study, source, method, seed, slots, vocab))
    if errors:
        raise StudyError(errors)
    return cells


def _cell(study: Study, source: Source, method: str, seed: int, slots: Optional[int], vocab: int) -> Cell:
    ft = study.finetune
    run = FinetuneRun(method=method, checkpoint=source.checkpoint or "", new_people=ft.new_people,
                      renderings=ft.renderings, top_t=ft.top_t, background=ft.background,
                      value_optimizer=ft.value_optimizer, old_qa_items=ft.old_qa_items, lora=ft.lora)
    lr = ft.lr.get(method, study.lr.value)
    train = dataclasses.replace(study.train, value_lr=ft.value_lr.get(method, study.train.value_lr))
    budget = {"kind": study.budget.kind, "value": study.budget.values()[0]}
    content = {"source": source.identity, "finetune": {**to_dict(run), "checkpoint": None}, "seed": seed, "lr": lr,
               "train": {k: v for k, v in to_dict(train).items()
                         if k not in ("steps", "tokens", "flops", "seed", "lr")},
               "budget": budget}
    digest = hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:10]
    experts = source.model.experts
    variant = memory_size_name(slots) if slots else f"{experts}x" if experts else None
    name = f"{method}-" + cell_run_name(source.model.family, source.model.base, variant, None, seed)
    cell = Cell(id=digest, name=name, study=study.name, family=source.model.family, base=source.model.base,
                memory_slots=slots, experts=experts, seed=seed, lr=lr, model=source.model, data=source.data,
                train=train, resources=study.resources, budget=budget, finetune=run)
    if not _account(cell, vocab, source.data.seq_len):
        raise StudyError([ConfigError(f"budget.{budget['kind']}", f"buys no step of {name}")])
    return cell
