"""A study's data, prepared before any cell starts: once per data section, as far as its largest cell reads.

`prepare_study_data(study, cells, uri, out)` finds each distinct data section of the cells, the
most training tokens any of its cells reads (the cells' budgets, already turned into steps and
tokens by the one budget rule), and prepares that set (data/tracked.py: Ray Data across the
cluster when the controller has joined one) in `<storage>/data`, or in the study's
`data-cache` without storage, where the cells' `open_run` then finds it. A bad source or an
unreachable storage is a `StudyError` naming `data.path`, `data.text_field` or `storage`.
"""

from __future__ import annotations

import json
from typing import Callable

from memlayers.config_schema import ConfigError
from memlayers.platform.cluster.storage import join
from memlayers.platform.data.build import check_source, run_need
from memlayers.platform.data.tracked import prepare_tracked
from memlayers.platform.study.cells import Cell
from memlayers.platform.study.schema import Study, StudyError
from memlayers.platform.tracking import client as tracking
from memlayers.platform.tracking.conventions import artifact_location


def study_data_root(study: Study) -> str:
    """Where the study's prepared sets live (what `launcher.data_root` gives its cells)."""
    return join(study.storage, "data") if study.storage else str(study.workdir_path() / "data-cache")


def prepare_study_data(study: Study, cells: list[Cell], uri: str, out: Callable[[str], None] = print,
                       whole: bool = False) -> list[dict]:
    """Prepare every data section the cells read (see the module docstring; `whole`: all of each
    corpus); returns the manifests."""
    largest: dict[str, tuple] = {}
    for cell in cells:
        key = json.dumps(cell.data.to_dict(), sort_keys=True, default=str)
        data, tokens = largest.get(key, (cell.data, 0))
        largest[key] = (data, max(tokens, int(cell.tokens or 0)))
    try:  # every source checked before anything is created
        for data, _ in largest.values():
            check_source(data, study_data_root(study))
    except ConfigError as error:
        raise StudyError([error]) from error
    if not largest:
        return []
    experiment_id = tracking.ensure_experiment(uri, study.name, artifact_location(uri, study.storage_root()))
    manifests = []
    for data, tokens in largest.values():
        try:
            need = None if whole else run_need(data.source, tokens)
            manifests.append(prepare_tracked(data, study_data_root(study), need, uri=uri,
                                             experiment_id=experiment_id, study=study.name, out=out, always=True))
        except ConfigError as error:
            raise StudyError([error]) from error
    return manifests
