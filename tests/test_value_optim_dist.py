"""allreduce_value_grads_ on a real 2-process gloo group: sparse rows gathered and averaged, dense all-reduced."""


import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from memlayers.kernels.value_optim import allreduce_value_grads_
from memlayers.platform.cluster.ports import free_port

N, V = 10, 3


def _rank_grads(rank: int):
    """Rank 0 reads rows 1, 4 (twice: an uncoalesced grad); rank 1 reads rows 4, 7; rank 1 has no grad for `idle`."""
    gen = torch.Generator().manual_seed(rank)
    rows = [[1, 4, 4], [4, 7]][rank]
    sparse = torch.sparse_coo_tensor(torch.tensor([rows]), torch.randn(len(rows), V, generator=gen), (N, V),
                                     check_invariants=True)
    dense = torch.randn(4, V, generator=gen)
    idle = torch.sparse_coo_tensor(torch.tensor([[2]]), torch.ones(1, V), (N, V), check_invariants=True)
    return sparse, dense, idle if rank == 0 else None


def _worker(rank: int, port: int, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        table, other, idle = (torch.zeros(N, V, requires_grad=True), torch.zeros(4, V, requires_grad=True),
                              torch.zeros(N, V, requires_grad=True))
        table.grad, other.grad, idle.grad = _rank_grads(rank)
        allreduce_value_grads_([table, other, idle])
        out[rank] = (table.grad.is_sparse, table.grad.to_dense(), other.grad.clone(), idle.grad.to_dense())
    finally:
        dist.destroy_process_group()


def test_allreduce_value_grads_averages_sparse_and_dense_over_gloo():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(free_port(), out), nprocs=2, join=True)
        results = dict(out)
    grads = [_rank_grads(r) for r in range(2)]
    want_table = (grads[0][0].to_dense() + grads[1][0].to_dense()) / 2
    want_other = (grads[0][1] + grads[1][1]) / 2
    want_idle = grads[0][2].to_dense() / 2
    for rank in range(2):
        is_sparse, table, other, idle = results[rank]
        assert is_sparse
        assert torch.allclose(table, want_table) and torch.allclose(other, want_other)
        assert torch.allclose(idle, want_idle)
    assert torch.equal(results[0][1], results[1][1])   # the ranks stay in sync bit for bit
    assert torch.count_nonzero(want_table.abs().sum(1)) == 3
