"""Reading points from CSV and writing fits: JSON with provenance, CSV of points, load back.

A saved fit is `<law>.json` (the LawFit record: law, params, intervals, objective, n_points,
provenance with the input file's sha256 or the study, fitter_version) and `<law>_points.csv`
(inputs, observed, predicted, residual = observed − predicted, log_residual). JSON is strict:
non-finite numbers (an unbounded multiplier) are written as null.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np

from memlayers.platform.laws.result import LawFit

CHINCHILLA_ENV = "MEMLAYERS_CHINCHILLA_CSV"


def chinchilla_csv_path() -> Path:
    """Epoch AI's extraction of Chinchilla's Figure 4: $MEMLAYERS_CHINCHILLA_CSV, else
    ../shared/data/chinchilla/svg_extracted_data.csv beside the repository (may not exist)."""
    if os.environ.get(CHINCHILLA_ENV):
        return Path(os.environ[CHINCHILLA_ENV])
    repo_root = Path(__file__).resolve().parents[2]
    return repo_root.parent / "shared" / "data" / "chinchilla" / "svg_extracted_data.csv"


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_provenance(path: str | Path) -> dict:
    path = Path(path)
    return {"file": str(path.resolve()), "sha256": sha256_file(path)}


def read_columns(path: str | Path, columns: list[str]) -> dict[str, np.ndarray]:
    """Named numeric columns of a CSV; ValueError naming the column, row and value at fault.

    Empty cells become NaN, which the laws reject with their own message.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(f"{path}: column(s) {missing} not found; the file has {header}")
        values: dict[str, list[float]] = {c: [] for c in columns}
        for row_number, row in enumerate(reader, start=2):
            for c in columns:
                cell = (row.get(c) or "").strip()
                try:
                    values[c].append(float(cell) if cell else math.nan)
                except ValueError:
                    raise ValueError(f"{path}: line {row_number}, column {c!r}: not a number: {cell!r}") from None
    return {c: np.array(v, dtype=float) for c, v in values.items()}


def jsonable(obj):
    """Plain JSON types: numpy scalars/arrays unwrapped, non-finite floats -> None."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def dumps(obj, indent: int | None = 2) -> str:
    return json.dumps(jsonable(obj), indent=indent, allow_nan=False)


def save_fit(fit: LawFit, out_dir: str | Path, inputs: dict[str, np.ndarray] | None = None,
             observed: np.ndarray | None = None) -> list[Path]:
    """Write `<law>.json` and, given the points, `<law>_points.csv`; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{fit.law}.json"
    json_path.write_text(dumps(fit.to_dict()) + "\n")
    written = [json_path]
    if inputs is not None and observed is not None:
        written.append(write_points(fit, out_dir / f"{fit.law}_points.csv", inputs, observed))
    return written


def write_points(fit: LawFit, path: Path, inputs: dict[str, np.ndarray], observed: np.ndarray) -> Path:
    predicted = fit.predict(*(inputs[name] for name in fit.inputs))
    observed = np.asarray(observed, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_residual = np.log(observed) - np.log(predicted)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*fit.inputs, "observed", "predicted", "residual", "log_residual"])
        for i in range(len(observed)):
            row = [inputs[name][i] for name in fit.inputs]
            row += [observed[i], predicted[i], observed[i] - predicted[i], log_residual[i]]
            writer.writerow([repr(float(v)) if math.isfinite(v) else "" for v in row])
    return path


def load_fit(path: str | Path) -> LawFit:
    """A LawFit from a saved `<law>.json` (ready to `.predict`)."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSON ({error})") from None
    return LawFit.from_dict(data)
