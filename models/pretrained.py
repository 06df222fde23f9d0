"""An exported model folder (`memlayers export`) back into a Transformer, with `safetensors` and no pickle.

The folder holds `config.json` (the model config under "model") and safetensors files named by
`model.safetensors.index.json`; the writer is `memlayers.platform.train.export`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from memlayers.config_schema import ConfigError, from_dict
from memlayers.models.attention import rope_tables
from memlayers.models.config import ModelConfig
from memlayers.models.transformer import Transformer

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
EXPORT_FORMAT = "memlayers-export-1"


def is_exported(directory: str | Path) -> bool:
    """Whether `directory` is an exported model folder (not a training checkpoint)."""
    return (Path(directory) / CONFIG_FILE).is_file() and (Path(directory) / INDEX_FILE).is_file()


def read_export_config(directory: str | Path) -> dict:
    """config.json of an exported folder; ConfigError naming the file when it is not one."""
    path = Path(directory) / CONFIG_FILE
    if not is_exported(directory):
        raise ConfigError(str(path), f"not an exported model folder (needs {CONFIG_FILE} and {INDEX_FILE})")
    config = json.loads(path.read_text())
    if config.get("format") != EXPORT_FORMAT:
        raise ConfigError(f"{path}.format", f"expected {EXPORT_FORMAT!r}, got {config.get('format')!r}")
    return config


def load_pretrained(directory: str | Path, device: str | torch.device = "cpu") -> Transformer:
    """The model of an exported folder, in eval mode on `device`."""
    # deferred: safetensors is needed only where exported folders are read
    from safetensors.torch import load_file

    directory = Path(directory)
    config = read_export_config(directory)
    model_cfg = from_dict(ModelConfig, config["model"], f"{directory / CONFIG_FILE}.model")
    with torch.device("meta"):
        model = Transformer(model_cfg)
    index = json.loads((directory / INDEX_FILE).read_text())["weight_map"]
    state: dict[str, torch.Tensor] = {}
    for name in sorted(set(index.values())):
        state.update(load_file(directory / name, device=str(device)))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ConfigError(str(directory / INDEX_FILE), f"weights do not fit the model: missing {missing[:3]}, "
                                                       f"unexpected {unexpected[:3]}")
    # the rotary tables are not saved (non-persistent buffers): computed again, as the constructor does
    model.rope_cos, model.rope_sin = (t.to(device) for t in rope_tables(model_cfg.head_dim, model_cfg.max_seq_len,
                                                                        model_cfg.rope_theta))
    return model.eval()
