"""DataConfig: defaults, dict round trip, and errors that name the offending field."""

from __future__ import annotations

import pytest

from memlayers.platform.data import ConfigError, DataConfig, FactsConfig


def test_defaults_and_tokenizer_default_depends_on_source():
    cfg = DataConfig()
    assert (cfg.source, cfg.tokenizer, cfg.seq_len, cfg.vocab_size) == ("facts", "word", 64, 4096)
    assert cfg.facts.people == 3000 and len(cfg.facts.attributes) == 4
    assert DataConfig(source="shakespeare").tokenizer == "byte"
    assert DataConfig.from_dict({"source": "shakespeare"}).tokenizer == "byte"
    assert DataConfig.from_dict({"source": "facts"}).tokenizer == "word"
    cfg.validate()


def test_from_dict_round_trip():
    data = {"source": "facts", "tokenizer": "bpe", "vocab_size": 300, "seq_len": 16, "seed": 3,
            "facts": {"people": 10, "attributes": ["birth_city", "major"], "renderings": 2}}
    cfg = DataConfig.from_dict(data)
    assert isinstance(cfg.facts, FactsConfig)
    assert cfg.facts.attributes == ("birth_city", "major")
    assert DataConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("data, message", [
    ({"facts": {"people": -3}}, "data.facts.people: must be a positive integer, got -3"),
    ({"foo": 1}, "data.foo: unknown key (expected one of"),
    ({"facts": {"bar": 1}}, "data.facts.bar: unknown key"),
    ({"seq_len": "64"}, "data.seq_len:"),
    ({"seq_len": 0}, "data.seq_len: must be a positive integer, got 0"),
    ({"source": "csv"}, "data.source: unknown source 'csv'"),
    ({"tokenizer": "sentencepiece"}, "data.tokenizer: unknown tokenizer"),
    ({"source": "jsonl"}, "data.path: source 'jsonl' needs a file"),
    ({"source": "hub"}, "data.name: source 'hub' needs a dataset name"),
    ({"val_fraction": 1.5}, "data.val_fraction: must be a number in [0, 1)"),
    ({"tokenizer": "bpe", "vocab_size": 100}, "data.vocab_size: a byte-level BPE needs at least 258"),
    ({"facts": {"attributes": ["birth_city", "shoe_size"]}}, "data.facts.attributes[1]: unknown attribute"),
    ({"facts": {"attributes": []}}, "data.facts.attributes: must be a non-empty list"),
    ({"facts": {"templates_per_attribute": 9}}, "data.facts.templates_per_attribute: must be <= 5"),
    ({"facts": {"values_per_attribute": 500}}, "data.facts.values_per_attribute: must be <= 200"),
    ({"facts": {"version": 99}}, "data.facts.version: this build generates facts version"),
    ({"streaming": "yes"}, "data.streaming:"),
])
def test_bad_fields_are_named(data, message):
    with pytest.raises(ConfigError) as info:
        DataConfig.from_dict(data, path="data")
    assert str(info.value).startswith(message), str(info.value)
    assert isinstance(info.value, ValueError)


def test_custom_path_prefix():
    with pytest.raises(ValueError, match=r"^run\.data\.facts\.people: must be a positive integer"):
        DataConfig.from_dict({"facts": {"people": 0}}, path="run.data")


def test_direct_construction_is_validated_by_validate():
    cfg = DataConfig(seq_len=-1)
    with pytest.raises(ValueError, match=r"^data\.seq_len:"):
        cfg.validate()
