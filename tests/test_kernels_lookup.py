"""The lookup ops (embedding bag, row dot) on the torch implementation: values, gradients, sparse layout, gradcheck."""

import pytest
import torch

from memlayers.kernels.check import densify_grad, random_case, reference_parts
from memlayers.kernels.lookup import embedding_bag, embedding_bag_reference, row_dot


def _run(case, impl="torch", sparse_grad=True):
    values = case.values_NV.clone().requires_grad_()
    weights = case.weights_TR.clone().requires_grad_()
    y = embedding_bag(values, case.slots_TR, weights, sparse_grad=sparse_grad, impl=impl)
    y.backward(case.grad_y_TV)
    return y.detach(), values.grad, weights.grad


@pytest.mark.parametrize("shape", [(13, 7, 5, 6), (40, 33, 9, 4), (5, 1, 3, 3)])
def test_torch_parts_match_reference_fp32(shape):
    for seed in range(3):
        case = random_case(*shape, seed=seed)
        y, grad_v, grad_w = _run(case)
        y_ref, rows_ref, grad_w_ref = reference_parts(case)
        unique = case.slots_TR.unique()
        assert torch.allclose(y.double(), y_ref, rtol=1e-5, atol=1e-6)
        assert torch.allclose(grad_v.to_dense()[unique].double(), rows_ref, rtol=1e-5, atol=1e-6)
        assert torch.allclose(grad_w.double(), grad_w_ref, rtol=1e-5, atol=1e-6)


def test_sparse_gradient_holds_exactly_the_rows_read():
    case = random_case(50, 6, 4, 5, seed=1)
    _, grad_v, _ = _run(case)
    # autograd drops the coalesced flag when storing .grad, but the rows are unique and sorted
    assert grad_v.is_sparse and grad_v.shape == (50, 6)
    assert torch.equal(grad_v._indices()[0], case.slots_TR.unique())
    _, grad_dense, _ = _run(case, sparse_grad=False)
    assert grad_dense.layout == torch.strided
    assert torch.equal(grad_v.to_dense(), grad_dense)
    unread = torch.ones(50, dtype=torch.bool)
    unread[case.slots_TR.unique()] = False
    assert (grad_dense[unread] == 0).all() and (grad_dense[~unread] != 0).any(dim=1).all()


def test_duplicate_slot_in_a_bag_counts_twice():
    values = torch.arange(12, dtype=torch.float32).view(4, 3).requires_grad_()
    slots = torch.tensor([[2, 2, 1]])
    weights = torch.tensor([[0.25, 0.5, 0.25]], requires_grad=True)
    y = embedding_bag(values, slots, weights, impl="torch")
    assert torch.allclose(y, 0.75 * values[2] + 0.25 * values[1])
    y.backward(torch.ones(1, 3))
    dense = values.grad.to_dense()
    assert torch.allclose(dense[2], torch.full((3,), 0.75)) and torch.allclose(dense[1], torch.full((3,), 0.25))
    assert torch.allclose(weights.grad, torch.tensor([[21.0, 21.0, 12.0]]))


def test_shared_table_accumulates_sparse_grads_from_two_reads():
    values = torch.randn(20, 4, requires_grad=True)
    s1, s2 = torch.tensor([[1, 3], [3, 5]]), torch.tensor([[3, 7]])
    w1, w2 = torch.rand(2, 2), torch.rand(1, 2)
    (embedding_bag(values, s1, w1).sum() + embedding_bag(values, s2, w2).sum()).backward()
    ref = torch.zeros(20, 4)
    ref.index_add_(0, s1.flatten(), w1.flatten()[:, None].expand(-1, 4))
    ref.index_add_(0, s2.flatten(), w2.flatten()[:, None].expand(-1, 4))
    assert values.grad.is_sparse
    assert torch.allclose(values.grad.to_dense(), ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_tables_accumulate_in_fp32(dtype):
    case = random_case(30, 20, 6, 16, dtype=dtype, seed=2)
    y, grad_v, grad_w = _run(case)
    y_ref, rows_ref, grad_w_ref = reference_parts(case)
    ulp = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    assert y.dtype == dtype and grad_v.dtype == dtype and grad_w.dtype == torch.float32
    # one rounding of an fp32-accurate result: within half an ulp of the largest magnitude
    assert (y.double() - y_ref).abs().max() <= ulp * y_ref.abs().max()
    assert (grad_v.to_dense()[case.slots_TR.unique()].double() - rows_ref).abs().max() <= ulp * rows_ref.abs().max()
    assert torch.allclose(grad_w.double(), grad_w_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sparse_grad", [True, False])
def test_gradcheck_float64_with_duplicates(sparse_grad):
    slots = torch.tensor([[1, 1, 4], [4, 0, 1], [2, 2, 2]])
    values = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(3, 3, dtype=torch.float64, requires_grad=True)

    def f(v, w):
        return embedding_bag(densify_grad(v), slots, w, sparse_grad=sparse_grad, impl="torch")

    assert torch.autograd.gradcheck(f, (values, weights))


def test_leading_dims_and_reference_agree():
    values = torch.randn(10, 4)
    slots = torch.randint(0, 10, (2, 3, 5))
    weights = torch.rand(2, 3, 5)
    y = embedding_bag(values, slots, weights)
    assert y.shape == (2, 3, 4)
    assert torch.allclose(y, embedding_bag_reference(values, slots.view(6, 5), weights.view(6, 5)).view(2, 3, 4),
                          atol=1e-6)


def test_backward_is_deterministic():
    case = random_case(16, 9, 32, 8, seed=3)
    first, second = _run(case), _run(case)
    assert torch.equal(first[1].to_dense(), second[1].to_dense()) and torch.equal(first[2], second[2])


def test_bad_arguments_are_named():
    values, slots, weights = torch.randn(4, 2), torch.zeros(2, 3, dtype=torch.long), torch.rand(2, 3)
    with pytest.raises(ValueError, match="impl"):
        embedding_bag(values, slots, weights, impl="cuda")
    with pytest.raises(ValueError, match="weights_TR"):
        embedding_bag(values, slots, weights[:, :2])
    with pytest.raises(TypeError, match="slots_TR"):
        embedding_bag(values, slots.float(), weights)


def test_row_dot_matches_the_gathered_dot_products_and_its_gradients():
    gen = torch.Generator().manual_seed(7)
    values = torch.randn(20, 6, generator=gen, requires_grad=True)
    slots = torch.tensor([[1, 1, 4], [4, 0, 1], [7, 2, 2], [19, 4, 1]])
    x = torch.randn(4, 6, generator=gen, requires_grad=True)
    grad_h = torch.randn(4, 3, generator=gen)
    h = row_dot(values, slots, x)
    h.backward(grad_h)
    values_ref, x_ref = values.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    h_ref = torch.einsum("trv,tv->tr", values_ref[slots], x_ref)
    h_ref.backward(grad_h)
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert values.grad.is_sparse and torch.equal(values.grad.coalesce()._indices()[0], slots.unique())
    torch.testing.assert_close(values.grad.to_dense(), values_ref.grad)


@pytest.mark.parametrize("sparse_grad", [True, False])
def test_row_dot_gradcheck_float64(sparse_grad):
    slots = torch.tensor([[1, 1, 4], [4, 0, 1], [2, 2, 2]])
    values = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)

    def f(v, x_TV):
        return row_dot(densify_grad(v), slots, x_TV, sparse_grad=sparse_grad, impl="torch")

    assert torch.autograd.gradcheck(f, (values, x))
