"""MoE routing: dropless token choice equals a per-token loop, the balance loss evens the load, expert choice."""

import pytest
import torch
from causality import later_token_changes

from memlayers.models.moe import MoE, load_imbalance


def test_dropless_dispatch_equals_a_per_token_computation():
    torch.manual_seed(0)
    moe = MoE(16, 24, experts=4, topk=2, shared_hidden_dim=None)
    moe.init_weights(0.1, 0.1)
    x = torch.randn(1, 10, 16)
    out = moe(x)[0]
    probs = torch.softmax(moe.router(x[0]).float(), -1)
    gates, experts = probs.topk(2, -1)
    gates = gates / gates.sum(-1, keepdim=True)
    for t in range(10):
        expected = sum(
            gates[t, j] * (torch.nn.functional.silu(x[0, t] @ moe.w1_EDF[e]) * (x[0, t] @ moe.w3_EDF[e]))
            @ moe.w2_EFD[e]
            for j, e in enumerate(experts[t].tolist())
        )
        torch.testing.assert_close(out[t], expected, rtol=1e-5, atol=1e-6)


def _train_router(balance_coef: float) -> float:
    torch.manual_seed(0)
    moe = MoE(16, 8, experts=8, topk=2, shared_hidden_dim=None)
    moe.init_weights(0.02, 0.02)
    with torch.no_grad():  # a router that starts badly skewed towards experts 0 and 1
        moe.router.weight[:2] += 0.5 * torch.randn(16).sign()
    optimizer = torch.optim.Adam(moe.parameters(), lr=1e-2)
    target = torch.nn.Linear(16, 16)
    for _ in range(150):
        x = torch.randn(256, 16)
        x = x.abs() * target.weight[0].detach().sign()  # inputs aligned with the skew
        loss = (moe(x[None])[0] - target(x).detach()).pow(2).mean() + balance_coef * moe.balance_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x = torch.randn(2048, 16).abs() * target.weight[0].detach().sign()
    moe(x[None])
    return load_imbalance(moe.last_load_E)


def test_balance_loss_keeps_expert_load_within_twice_uniform():
    balanced = _train_router(balance_coef=1.0)
    unbalanced = _train_router(balance_coef=0.0)
    assert balanced <= 2.0, balanced
    assert unbalanced > balanced


def test_top1_router_learns_from_the_task_loss_alone():
    """At top-1 a renormalised gate is identically 1: the expert output must be scaled by the raw
    softmax probability (Switch) so that the router gets a gradient without the balance loss."""
    torch.manual_seed(0)
    grads = {}
    for topk in (1, 2):
        moe = MoE(16, 24, experts=4, topk=topk, shared_hidden_dim=None)
        moe.init_weights(0.1, 0.1)
        x, target = torch.randn(1, 64, 16), torch.randn(1, 64, 16)
        ((moe(x) - target) ** 2).mean().backward()   # the task loss only, no balance loss
        grads[topk] = float(moe.router.weight.grad.norm())
    assert grads[1] > 1e-3 * grads[2] and grads[1] > 1e-4, grads


def _expert(moe: MoE, e: int, x_D: torch.Tensor) -> torch.Tensor:
    return (torch.nn.functional.silu(x_D @ moe.w1_EDF[e]) * (x_D @ moe.w3_EDF[e])) @ moe.w2_EFD[e]


def _expert_choice_moe(capacity_factor: float = 1.0) -> MoE:
    torch.manual_seed(0)
    moe = MoE(16, 24, experts=4, topk=2, shared_hidden_dim=None, routing="expert_choice",
              capacity_factor=capacity_factor)
    moe.init_weights(0.3, 0.1)
    return moe


def test_expert_choice_in_training_lets_each_expert_pick_its_top_c_tokens():
    moe = _expert_choice_moe(capacity_factor=1.5).train()
    x = torch.randn(2, 10, 16)
    out = moe(x).reshape(20, 16)
    probs = torch.softmax(moe.router(x.reshape(20, 16)).float(), -1)
    capacity = int(1.5 * 20 / 4)   # 7 tokens per expert
    expected = torch.zeros(20, 16)
    for e in range(4):
        gates, tokens = probs[:, e].topk(capacity)
        for g, t in zip(gates, tokens.tolist()):
            expected[t] += g * _expert(moe, e, x.reshape(20, 16)[t])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert float(moe.balance_loss) == 0.0
    assert 0.0 <= float(moe.last_unrouted) < 1.0


def test_expert_choice_in_eval_mode_is_top1_token_choice_on_the_same_router():
    moe = _expert_choice_moe().eval()
    x = torch.randn(1, 12, 16)
    out = moe(x)[0]
    probs = torch.softmax(moe.router(x[0]).float(), -1)
    gate, expert = probs.max(-1)
    for t in range(12):
        torch.testing.assert_close(out[t], gate[t] * _expert(moe, int(expert[t]), x[0, t]), rtol=1e-5, atol=1e-6)


def test_expert_choice_router_learns_without_a_balance_loss():
    moe = _expert_choice_moe().train()
    x, target = torch.randn(1, 32, 16), torch.randn(1, 32, 16)
    ((moe(x) - target) ** 2).mean().backward()
    assert float(moe.router.weight.grad.norm()) > 1e-4


def _expert_choice_model():
    from memlayers.models.config import ModelConfig, MoEConfig
    from memlayers.models.transformer import Transformer
    torch.manual_seed(0)
    cfg = ModelConfig(family="moe", vocab_size=61, dim=32, n_layers=2, n_heads=4, max_seq_len=32,
                      moe=MoEConfig(experts=4, routing="expert_choice", capacity_factor=1.0))
    return Transformer(cfg)


def test_expert_choice_is_causal_in_eval_mode():
    model = _expert_choice_model().eval()
    for t, before, after in later_token_changes(model):
        torch.testing.assert_close(before[:, : t + 1], after[:, : t + 1], rtol=0, atol=1e-6)


def test_expert_choice_in_training_mode_sees_future_tokens():
    """The documented caveat, checked: in training the routing of earlier positions depends on
    later ones, so changing the second half of every sequence changes some first-half outputs
    (this is why evaluation switches to token choice)."""
    model = _expert_choice_model().train()
    tokens = torch.randint(0, 61, (2, 16))
    changed = tokens.clone()
    changed[:, 8:] = torch.randint(0, 61, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    assert not torch.allclose(before[:, :8], after[:, :8], atol=1e-6)


def test_expert_choice_accounting_counts_capacity_factor_experts_per_token():
    from memlayers.models.accounting import account
    from memlayers.models.config import ModelConfig, MoEConfig
    d, e, f, cf = 32, 4, 24, 1.5
    def cfg(routing, **moe):
        return ModelConfig(family="moe", vocab_size=50, dim=d, n_layers=1, n_heads=4, max_seq_len=16,
                           moe=MoEConfig(experts=e, expert_ffn_dim=f, routing=routing, **moe))
    token, expert = account(cfg("token_choice", topk=1)), account(cfg("expert_choice", capacity_factor=cf))
    # the router and all E experts exist either way; a token runs 1.5 experts on average instead of 1
    assert expert.total_params == token.total_params
    assert expert.active_params - token.active_params == round((cf - 1) * 3 * d * f)
    assert expert.forward_flops_per_token - token.forward_flops_per_token == round((cf - 1) * 2 * 3 * d * f)
    assert expert.train_flops_per_token == 3 * expert.forward_flops_per_token


def test_moe_routing_options_are_validated_by_name():
    from memlayers.config_schema import ConfigError, from_dict
    from memlayers.models.config import ModelConfig
    for moe, field in (({"routing": "random"}, "model.moe.routing"),
                       ({"capacity_factor": 0}, "model.moe.capacity_factor")):
        with pytest.raises(ConfigError) as error:
            from_dict(ModelConfig, {"family": "moe", "moe": moe}, "model")
        assert str(error.value).startswith(field + ":"), str(error.value)
