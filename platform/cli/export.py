"""`memlayers export CHECKPOINT|RUN_ID --out DIR`: a trained model as config.json, safetensors, tokenizer, card.

    memlayers export runs/tiny/checkpoints/checkpoint_000001 --out exported/
    memlayers export RUN_ID --tracking-uri sqlite:///runs/tiny/mlflow.db --out exported/

An MLflow run id exports the run's final checkpoint. `memlayers.models.pretrained.load_pretrained(DIR)`
reads the folder back; `memlayers eval DIR` evaluates it. Bad input is one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="CHECKPOINT|RUN_ID", help="a checkpoint folder or an MLflow run id")
    parser.add_argument("--out", required=True, help="the folder to write (created)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI of a run id (default: $MLFLOW_TRACKING_URI)")
    parser.add_argument("--max-file-gb", type=float, default=2.0, help="largest safetensors file of dense tensors")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # deferred: torch, MLflow and the training code only for this command
    from memlayers.platform.eval.targets import resolve_targets
    from memlayers.platform.eval.tasks import EvalInputError
    from memlayers.platform.train.export import export_checkpoint

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"memlayers export: --out {out}: exists and is not empty", file=sys.stderr)
        return 2
    if args.max_file_gb <= 0:
        print(f"memlayers export: --max-file-gb: must be > 0, got {args.max_file_gb}", file=sys.stderr)
        return 2
    try:
        targets = resolve_targets(args.source, args.tracking_uri)
    except EvalInputError as error:
        print(f"memlayers export: {error}", file=sys.stderr)
        return 2
    if len(targets) != 1:
        print(f"memlayers export: {args.source}: names {len(targets)} checkpoints, export takes one", file=sys.stderr)
        return 2
    target = targets[0]
    source = f"MLflow run {target.run_id} ({target.location})" if target.run_id else target.location
    exported = export_checkpoint(target.checkpoint, out, source=source, max_file_bytes=int(args.max_file_gb * 2**30))
    print(f"exported {source} to {out}: {len(exported.files)} safetensors files, {exported.total_bytes:,} bytes")
    return 0
