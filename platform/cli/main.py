"""The `memlayers` command line: one sub-command per module, registered by name.

Each command module exposes `register(parser)`, which adds its arguments and sets
`func=callable(args) -> int` as a default. Modules are imported only when their command is
used (or when help lists them), so `memlayers models` does not pay for Ray or MLflow.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("memlayers.platform.cli.models", "parameter and FLOP accounting of the presets"),
    "train": ("memlayers.platform.cli.train", "run one training run on Ray Train"),
    "study": ("memlayers.platform.cli.study", "validate, run, submit and inspect studies"),
    "data": ("memlayers.platform.cli.data", "tokenize a study's corpus once into shards in storage (Ray Data)"),
    "fit": ("memlayers.platform.cli.fit", "fit scaling laws to a CSV or a study's runs"),
    "predict": ("memlayers.platform.cli.predict", "the loss of (N, M, D) under a fitted joint law, with its interval"),
    "plan": ("memlayers.platform.cli.plan", "the compute-optimal (N, M, D) for a budget under a fitted joint law"),
    "report": ("memlayers.platform.cli.report", "write a study's HTML report"),
    "dashboard": ("memlayers.platform.cli.dashboard", "serve the MLflow UI over a study's store"),
    "eval": ("memlayers.platform.cli.eval", "downstream tasks (nq_open, triviaqa, facts_qa, lm_eval's) on checkpoints"),
    "bench": ("memlayers.platform.cli.bench", "benchmarks that print numbers"),
    "export": ("memlayers.platform.cli.export",
               "a checkpoint or run as config.json, safetensors, tokenizer, model card"),
}


def build_parser(commands: dict[str, tuple[str, str]] = COMMANDS, prog: str = "memlayers") -> argparse.ArgumentParser:
    """An argument parser with one sub-parser per command whose module imports."""
    parser = argparse.ArgumentParser(prog=prog)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in commands.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name and module_name.startswith(error.name):
                sub.set_defaults(func=_unavailable(name))
                continue
            raise
        module.register(sub)
    return parser


def _unavailable(name: str):
    def run(args: argparse.Namespace) -> int:
        print(f"memlayers {name}: not available in this installation", file=sys.stderr)
        return 2

    return run


def run_commands(argv: Sequence[str] | None, commands: dict[str, tuple[str, str]], prog: str) -> int:
    """Parse `argv` against `commands` and run the chosen one; returns its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = {k: v for k, v in commands.items() if argv and argv[0] == k} or commands
    parser = build_parser(selected, prog)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        build_parser(commands, prog).print_help()
        return 2
    return int(args.func(args) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    return run_commands(argv, COMMANDS, "memlayers")


if __name__ == "__main__":
    sys.exit(main())
