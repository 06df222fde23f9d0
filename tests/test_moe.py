"""MoE routing: dropless dispatch equals a per-token loop; the balance loss evens the load."""

import torch

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
            gates[t, j] * (torch.nn.functional.silu(x[0, t] @ moe.w1_EDF[e]) * (x[0, t] @ moe.w3_EDF[e])) @ moe.w2_EFD[e]
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
    for step in range(150):
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
