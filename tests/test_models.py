"""Every registered model family: causality, learning, gradients, value sharing, config errors."""

import pytest
import torch
from causality import later_token_changes

from memlayers.config_schema import ConfigError, from_dict
from memlayers.models.config import FAMILIES, MemoryConfig, ModelConfig, MoEConfig, PeerConfig
from memlayers.models.memory import MemoryLayer
from memlayers.models.transformer import Transformer


def tiny_config(family: str, **overrides) -> ModelConfig:
    fields = dict(family=family, vocab_size=61, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=32)
    if family in ("pkm", "memory_plus"):
        fields["memory"] = MemoryConfig(slots=256, heads=2, topk=4, sparse_grad=False)
    if family == "moe":
        fields["moe"] = MoEConfig(experts=4, topk=2, shared_expert=True)
    if family == "peer":
        fields["peer"] = PeerConfig(experts=256, heads=2, topk=4, sparse_grad=False)
    fields.update(overrides)
    return ModelConfig(**fields)


@pytest.mark.parametrize("family", FAMILIES)
def test_changing_a_later_token_never_changes_earlier_outputs(family):
    torch.manual_seed(0)
    model = Transformer(tiny_config(family)).eval()
    for t, before, after in later_token_changes(model):
        torch.testing.assert_close(before[:, : t + 1], after[:, : t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(before[:, t + 1:], after[:, t + 1:])


@pytest.mark.parametrize("family", FAMILIES)
def test_one_training_step_reduces_the_loss_on_a_fixed_batch(family):
    torch.manual_seed(0)
    model = Transformer(tiny_config(family))
    tokens = torch.randint(0, 61, (4, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss, ce_before = model.loss(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        _, ce_after = model.loss(tokens[:, :-1], tokens[:, 1:])
    assert ce_after < ce_before


def test_gradients_reach_queries_keys_gates_and_the_shared_values_from_every_memory_layer():
    torch.manual_seed(0)
    model = Transformer(tiny_config("memory_plus"))
    layers = model.memory_layers()
    assert len(layers) == 3
    tokens = torch.randint(0, 61, (2, 16))
    model.loss(tokens[:, :-1], tokens[:, 1:])[0].backward()
    for layer in layers:
        for param in (layer.query.weight, layer.keys_2HnQ, layer.gate.weight, layer.out.weight, layer.query_gain_Q):
            assert param.grad is not None and param.grad.abs().sum() > 0
    # each layer alone sends gradient into the shared table: only the rows it read
    values = model.memory_values.weight
    for layer in layers:
        model.zero_grad()
        hooks = [other.register_forward_hook(lambda m, i, o: o.detach()) for other in layers if other is not layer]
        model.loss(tokens[:, :-1], tokens[:, 1:])[0].backward()
        for hook in hooks:
            hook.remove()
        rows_with_grad = set(torch.nonzero(values.grad.abs().sum(1)).flatten().tolist())
        assert rows_with_grad and rows_with_grad <= set(layer.last_slots_TR.flatten().tolist())


def test_memory_plus_layers_share_one_value_tensor_and_models_do_not():
    first, second = Transformer(tiny_config("memory_plus")), Transformer(tiny_config("memory_plus"))
    storages = {layer.table.weight.data_ptr() for layer in first.memory_layers()}
    assert len(storages) == 1
    assert storages != {layer.table.weight.data_ptr() for layer in second.memory_layers()}
    assert len(first.value_parameters()) == 1
    names = [name for name, _ in first.named_parameters() if "values" in name]
    assert names == ["memory_values.weight"]


def test_pkm_layers_own_their_values():
    model = Transformer(tiny_config("pkm", memory=MemoryConfig(slots=256, heads=2, topk=4, n_layers=2)))
    assert len(model.memory_layers()) == 2
    assert len({t.weight.data_ptr() for t in model.value_tables()}) == 2


def test_memory_plus_places_three_evenly_spaced_layers():
    assert tiny_config("memory_plus", n_layers=24).memory_layers == [6, 12, 18]
    assert tiny_config("memory_plus", n_layers=4).memory_layers == [1, 2, 3]


@pytest.mark.parametrize("data, field", [
    ({"family": "mem+"}, "model.family"),
    ({"dim": 30, "n_heads": 4}, "model.n_heads"),
    ({"dim": "big"}, "model.dim"),
    ({"n_kv_heads": 3}, "model.n_kv_heads"),
    ({"colour": 1}, "model.colour"),
    ({"family": "memory_plus", "memory": {"slots": 1000}}, "model.memory.slots"),
    ({"family": "memory_plus", "memory": {"slots": 64, "topk": 9}}, "model.memory.topk"),
    ({"family": "pkm"}, "model.memory"),
    ({"family": "moe", "moe": {"experts": 2, "topk": 3}}, "model.moe.topk"),
    ({"family": "dense", "moe": {"experts": 2}}, "model.moe"),
    ({"family": "memory_plus", "n_layers": 2, "memory": {"slots": 64, "topk": 4, "layers": [0, 5]}},
     "model.memory.layers"),
])
def test_an_invalid_config_names_its_field(data, field):
    with pytest.raises(ConfigError) as error:
        from_dict(ModelConfig, data, "model")
    assert str(error.value).startswith(field + ":"), str(error.value)


def test_the_default_key_dim_is_the_largest_even_number_up_to_a_quarter_of_dim():
    from memlayers.models.config import default_key_dim
    assert [default_key_dim(d) for d in (4, 8, 32, 36, 44, 64)] == [2, 2, 8, 8, 10, 16]
    for family in ("pkm", "peer"):
        cfg = tiny_config(family, dim=36, n_heads=2, n_kv_heads=None)
        assert cfg.key_dim == 8
        layer = (Transformer(cfg).memory_layers() or Transformer(cfg).peer_layers())[0]
        assert layer.key_dim == 8


def test_memory_layer_values_default_to_model_dim_and_key_dim_quarter():
    model = Transformer(tiny_config("memory_plus", dim=64, n_heads=4))
    layer: MemoryLayer = model.memory_layers()[0]
    assert layer.table.value_dim == 64 and layer.key_dim == 16
