"""The Triton embedding-bag kernels, run on the CPU under TRITON_INTERPRET=1 against the torch reference.

TRITON_INTERPRET must be set before triton is imported, and must not leak into other tests: the
parent test re-runs this file in a child pytest process with the flag set; the kernel tests exist
only in that child (they are defined under `if INTERPRETED`), so nothing here imports triton in
the main test process.
"""

import os
import re
import subprocess
import sys

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

if not INTERPRETED:

    def test_triton_kernels_under_the_interpreter():
        env = dict(os.environ, TRITON_INTERPRET="1")
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                              env=env, capture_output=True, text=True, timeout=900)
        report = proc.stdout[-4000:] + proc.stderr[-2000:]
        assert proc.returncode == 0, report
        passed = re.search(r"(\d+) passed", proc.stdout)
        assert passed and int(passed.group(1)) >= 10 and "skipped" not in proc.stdout, report

else:
    from memlayers.kernels import bag_triton
    from memlayers.kernels.check import backend_errors, densify_grad, random_case, reference_parts
    from memlayers.kernels.lookup import embedding_bag, row_dot
    from memlayers.kernels.segments import segments_of

    # (n, v, t, k): V not a power of two, V over one 64-column block, T over one 16-token block
    SHAPES = [(13, 7, 5, 6), (40, 70, 3, 5), (9, 1, 20, 3), (6, 33, 4, 17)]

    @pytest.mark.parametrize("shape", SHAPES)
    def test_fp32_parts_match_reference_with_poisoned_outputs(shape):
        for seed in range(2):
            errors = backend_errors(bag_triton, random_case(*shape, seed=seed))
            assert max(errors.values()) < 1e-5, errors

    def test_fp64_parts_are_exact_to_rounding():
        errors = backend_errors(bag_triton, random_case(11, 5, 4, 6, dtype=torch.float64))
        assert max(errors.values()) < 1e-12, errors

    @pytest.mark.parametrize("dtype, bits", [(torch.bfloat16, 8), (torch.float16, 11)])
    def test_low_precision_storage_accumulates_in_fp32(dtype, bits):
        errors = backend_errors(bag_triton, random_case(30, 20, 6, 16, dtype=dtype, seed=4))
        # the output is one rounding of an fp32 sum (the interpreter truncates bf16: one ulp)
        assert errors["forward"] < 2.0 ** (1 - bits), errors
        assert errors["value_grad"] < 1e-5 and errors["weight_grad"] < 1e-5, errors

    def test_value_grad_is_deterministic():
        case = random_case(8, 12, 16, 8, seed=5)
        segs = segments_of(case.slots_TR)
        first = bag_triton.value_grad_rows(case.grad_y_TV, case.weights_TR, segs)
        second = bag_triton.value_grad_rows(case.grad_y_TV, case.weights_TR, segs)
        assert torch.equal(first, second)

    def test_autograd_through_triton_matches_torch_impl():
        case = random_case(25, 10, 6, 7, seed=6)
        grads = {}
        for impl in ("triton", "torch"):
            values = case.values_NV.clone().requires_grad_()
            weights = case.weights_TR.clone().requires_grad_()
            y = embedding_bag(values, case.slots_TR, weights, impl=impl)
            y.backward(case.grad_y_TV)
            grads[impl] = (y.detach(), values.grad, weights.grad)
        (y_t, gv_t, gw_t), (y_r, gv_r, gw_r) = grads["triton"], grads["torch"]
        assert gv_t.is_sparse and torch.equal(gv_t._indices(), gv_r._indices())
        assert torch.allclose(y_t, y_r, rtol=1e-5, atol=1e-6)
        assert torch.allclose(gv_t._values(), gv_r._values(), rtol=1e-5, atol=1e-6)
        assert torch.allclose(gw_t, gw_r, rtol=1e-5, atol=1e-6)
        _, rows_ref, _ = reference_parts(case)
        assert torch.allclose(gv_t._values().double(), rows_ref, rtol=1e-5, atol=1e-6)

    def test_row_dot_through_triton_matches_torch_impl():
        case = random_case(25, 10, 6, 7, seed=8)
        grads = {}
        for impl in ("triton", "torch"):
            values = case.values_NV.clone().requires_grad_()
            x = case.grad_y_TV.clone().requires_grad_()
            h = row_dot(values, case.slots_TR, x, impl=impl)
            h.backward(case.weights_TR)
            grads[impl] = (h.detach(), values.grad, x.grad)
        (h_t, gv_t, gx_t), (h_r, gv_r, gx_r) = grads["triton"], grads["torch"]
        assert gv_t.is_sparse and torch.equal(gv_t._indices(), gv_r._indices())
        for got, want in ((h_t, h_r), (gv_t._values(), gv_r._values()), (gx_t, gx_r)):
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)

    @pytest.mark.parametrize("sparse_grad", [True, False])
    def test_gradcheck_float64_with_duplicates(sparse_grad):
        slots = torch.tensor([[1, 1, 4], [4, 0, 1]])
        values = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
        weights = torch.rand(2, 3, dtype=torch.float64, requires_grad=True)

        def f(v, w):
            return embedding_bag(densify_grad(v), slots, w, sparse_grad=sparse_grad, impl="triton")

        assert torch.autograd.gradcheck(f, (values, weights))
