"""Decoding with the key/value cache equals the no-cache reference, token for token, for every
family: greedy and sampled, ragged batches of prompts, stop tokens and stop conditions."""

import pytest
import torch

from memlayers.models.config import FAMILIES, MemoryConfig, ModelConfig, MoEConfig, PeerConfig
from memlayers.models.generate import generate
from memlayers.models.transformer import Transformer

VOCAB = 61


def tiny_model(family: str) -> Transformer:
    fields = dict(family=family, vocab_size=VOCAB, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=48,
                  init_std=0.2)  # a large init makes the logits peaked: no near-ties for rounding to flip
    if family in ("pkm", "memory_plus"):
        fields["memory"] = MemoryConfig(slots=256, heads=2, topk=4)
    if family == "moe":
        fields["moe"] = MoEConfig(experts=4, topk=2, shared_expert=True)
    if family == "peer":
        fields["peer"] = PeerConfig(experts=256, heads=2, topk=4)
    torch.manual_seed(0)
    return Transformer(ModelConfig(**fields)).eval()


def ragged_prompts(count: int = 4) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(2, VOCAB, (length,), generator=generator).tolist() for length in (1, 7, 3, 12)[:count]]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_decoding_with_the_cache_equals_the_no_cache_reference(family):
    model, prompts = tiny_model(family), ragged_prompts()
    cached = generate(model, prompts, 12)
    assert cached == generate(model, prompts, 12, use_cache=False)
    assert all(len(row) == 12 for row in cached)
    assert len({tuple(row) for row in cached}) > 1  # the rows really differ


@pytest.mark.parametrize("family", FAMILIES)
def test_sampled_decoding_with_the_cache_equals_the_reference_and_depends_on_the_seed(family):
    model, prompts = tiny_model(family), ragged_prompts()
    cached = generate(model, prompts, 10, temperature=1.5, top_k=20, seed=3)
    assert cached == generate(model, prompts, 10, temperature=1.5, top_k=20, seed=3, use_cache=False)
    assert cached != generate(model, prompts, 10, temperature=1.5, top_k=20, seed=4)
    assert cached != generate(model, prompts, 10)


def test_a_row_decodes_the_same_alone_as_in_a_ragged_batch():
    model, prompts = tiny_model("memory_plus"), ragged_prompts()
    batch = generate(model, prompts, 8, temperature=1.0, seed=5)
    for row, prompt in enumerate(prompts):
        # row r of a batch uses the generator seeded seed + r
        assert generate(model, [prompt], 8, temperature=1.0, seed=5 + row) == [batch[row]]


def test_stop_tokens_end_a_row_and_are_not_returned_stop_conditions_keep_their_token():
    model, prompts = tiny_model("dense"), ragged_prompts()
    free = generate(model, prompts, 10)
    stop_token = free[1][3]
    stopped = generate(model, prompts, 10, stop_ids=[stop_token])
    for row, tokens in zip(free, stopped):
        cut = row.index(stop_token) if stop_token in row else len(row)
        assert tokens == row[:cut]
    assert stopped == generate(model, prompts, 10, stop_ids=[stop_token], use_cache=False)

    def after_two(row: int, new: list[int]) -> bool:
        return len(new) >= 2 + row

    conditioned = generate(model, prompts, 10, stop=after_two)
    assert conditioned == [row[:2 + r] for r, row in enumerate(free)]
    assert conditioned == generate(model, prompts, 10, stop=after_two, use_cache=False)


def test_the_cache_refuses_more_positions_than_the_model_has():
    model = tiny_model("dense")
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [[3] * 40], 20)
