"""A trained model from a checkpoint folder: run config, weights (weights_only=True), tokenizer.

A checkpoint written by the training loop holds `meta.json` with the run config (`run`) and the
tokenizer kind, the tokenizer's own files, `state-rank0.pt` (read with `weights_only=True`) and,
for memory-parallel runs, the value-table shards (re-assembled at any shard count). The QA
split of a synthetic-facts run is rebuilt from its data config: the same world, the same
tokenizer, hence the same items the training loop scored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from memlayers.config_schema import ConfigError
from memlayers.models.transformer import Transformer
from memlayers.platform.data import facts as facts_mod
from memlayers.platform.data.qa import QAItem, tokenize_pairs
from memlayers.platform.data.tokenizers import Tokenizer, load_tokenizer
from memlayers.platform.eval.tasks import EvalInputError
from memlayers.platform.train.checkpoint import load_state, state_file
from memlayers.platform.train.loop import plan_run
from memlayers.platform.train.run_config import RunConfig, run_config_from_dict
from memlayers.platform.train.shard_checkpoint import load_values


@dataclass
class TrainedModel:
    model: Transformer                  # in eval mode, on `device`
    tokenizer: Tokenizer
    run: RunConfig
    step: int
    directory: Path

    def qa_items(self) -> list[QAItem]:
        """The run's QA split (synthetic facts only; [] for other corpora)."""
        data = self.run.data
        if data.source != "facts":
            return []
        world = facts_mod.generate_world(data.facts)
        return tokenize_pairs(facts_mod.qa_pairs(world, data.seed), self.tokenizer)


def read_meta(directory: str | Path) -> dict:
    """The checkpoint's meta.json; EvalInputError when the folder is not a loadable checkpoint."""
    directory = Path(directory)
    meta_path = directory / "meta.json"
    if not state_file(directory).is_file() or not meta_path.is_file():
        raise EvalInputError(f"checkpoint {directory}: not a memlayers checkpoint (no state-rank0.pt and meta.json)")
    meta = json.loads(meta_path.read_text())
    if "run" not in meta or "tokenizer" not in meta:
        raise EvalInputError(f"checkpoint {directory}: meta.json has no run config and tokenizer "
                             "(written before checkpoints carried them; retrain or resume the run once)")
    return meta


def load_trained(directory: str | Path, device: str | torch.device = "cpu") -> TrainedModel:
    """The model of a checkpoint folder, its tokenizer and run config (see the module docstring)."""
    directory = Path(directory)
    meta = read_meta(directory)
    try:
        run = run_config_from_dict(meta["run"])
    except ConfigError as error:
        raise EvalInputError(f"checkpoint {directory}: run config: {error}") from None
    tokenizer = load_tokenizer(meta["tokenizer"], directory)
    plan = plan_run(run, tokenizer.vocab_size)
    model = Transformer(plan.model)
    state = load_state(directory, 0, map_location="cpu")
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    sharded = any(directory.glob("values-t*-p*-r*.pt"))
    if sharded:
        load_values(model, directory)
    if unexpected or (missing and not sharded):
        raise EvalInputError(f"checkpoint {directory}: weights do not fit the model "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.to(device).eval()
    return TrainedModel(model, tokenizer, run, int(meta.get("step", state.get("step", 0))), directory)
