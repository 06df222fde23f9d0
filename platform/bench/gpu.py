"""`memlayers bench gpu` (`make gpu-check`): one JSON checking on a CUDA machine what a CPU cannot.

- kernels: every Triton kernel against the torch implementation through autograd (forward, value
  and weight gradients), fp32 and bf16, value dims that are and are not powers of two;
- bandwidth: the embedding bag's forward GB/s against the device's peak (memory clock x bus width);
- bf16: a few training steps of every family under bf16 autocast beside fp32 from the same start:
  finite losses, and how far apart;
- parallel: FSDP2 + memory-parallel steps of a small Memory+ model on every GPU present (NCCL),
  with the sharded value table's lookup against the full table's;
- decode: greedy decoding tokens/s of each family with the key/value cache.
Each part that raises is reported with its error; the exit code is 1 when any part failed a check.
Without CUDA it says so in one line and exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import traceback

KERNEL_TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}
BF16_LOSS_TOLERANCE = 0.05  # relative distance of bf16 and fp32 losses over the first steps
FAMILIES = ("dense", "moe", "pkm", "memory_plus", "peer")


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=4, help="training steps per family and dtype")
    parser.set_defaults(func=run)


def _tiny(family: str, vocab: int = 512):
    # deferred: a bench target imports what it measures only when it runs
    from memlayers.models.config import MemoryConfig, ModelConfig, MoEConfig, PeerConfig

    extra = {"memory_plus": {"memory": MemoryConfig(slots=65536, heads=4, topk=32)},
             "pkm": {"memory": MemoryConfig(slots=65536, heads=4, topk=32, n_layers=1)},
             "moe": {"moe": MoEConfig(experts=4, topk=2)},
             "peer": {"peer": PeerConfig(experts=16384, heads=4, topk=16, n_layers=1)}}.get(family, {})
    return ModelConfig(family=family, vocab_size=vocab, dim=256, n_layers=4, n_heads=4, max_seq_len=256, **extra)


def check_kernels() -> dict:
    # deferred: a bench target imports what it measures only when it runs
    import torch

    from memlayers.kernels.lookup import embedding_bag

    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        for value_dim in (128, 96):
            gen = torch.Generator(device="cuda").manual_seed(0)
            values = torch.randn(4096, value_dim, device="cuda", generator=gen).to(dtype)
            slots = torch.randint(0, 4096, (512, 64), device="cuda", generator=gen)
            weights = torch.softmax(torch.randn(512, 64, device="cuda", generator=gen), -1)
            grad = torch.randn(512, value_dim, device="cuda", generator=gen).to(dtype)
            parts = {}
            for impl in ("triton", "torch"):
                v, w = values.clone().requires_grad_(), weights.clone().requires_grad_()
                y = embedding_bag(v, slots, w, impl=impl)
                y.backward(grad)
                parts[impl] = (y.float(), v.grad.to_dense().float(), w.grad.float())
            errors = [float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
                      for a, b in zip(parts["triton"], parts["torch"])]
            name = f"{str(dtype).removeprefix('torch.')}/V={value_dim}"
            out[name] = {"forward": errors[0], "value_grad": errors[1], "weight_grad": errors[2],
                         "ok": max(errors) < KERNEL_TOLERANCE[str(dtype).removeprefix("torch.")]}
    return out


def peak_bandwidth() -> float | None:
    """Bytes/s of the device's memory: double data rate x clock x bus width, where torch reports them."""
    # deferred: a bench target imports what it measures only when it runs
    import torch

    props = torch.cuda.get_device_properties(0)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)
    return 2 * clock_khz * 1e3 * bus_bits / 8 if clock_khz and bus_bits else None


def check_bandwidth() -> dict:
    # deferred: a bench target imports what it measures only when it runs
    import torch

    from memlayers.kernels import bag_triton
    from memlayers.platform.bench.kernels import time_cuda

    n, v, t, k = 1 << 20, 512, 4096, 128
    values = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
    slots = torch.randint(0, n, (t, k), device="cuda")
    weights = torch.softmax(torch.randn(t, k, device="cuda"), -1)
    ms = time_cuda(lambda: bag_triton.forward(values, slots, weights), 20)
    moved = (t * k * v + t * v) * values.element_size()
    achieved, peak = moved / ms * 1e3, peak_bandwidth()
    return {"shape": {"N": n, "V": v, "T": t, "K": k, "dtype": "bfloat16"}, "ms": ms, "GB_per_s": achieved / 1e9,
            "peak_GB_per_s": peak / 1e9 if peak else None, "fraction_of_peak": achieved / peak if peak else None}


def _losses(family: str, bf16: bool, steps: int) -> list[float]:
    # deferred: a bench target imports what it measures only when it runs
    import torch

    from memlayers.models.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(_tiny(family)).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator(device="cuda").manual_seed(1)
    losses = []
    for _ in range(steps):
        tokens = torch.randint(0, 512, (8, 129), device="cuda", generator=gen)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = model.loss(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return losses


def check_bf16(steps: int) -> dict:
    out = {}
    for family in FAMILIES:
        fp32, bf16 = _losses(family, False, steps), _losses(family, True, steps)
        gap = max(abs(a - b) / abs(a) for a, b in zip(fp32, bf16))
        out[family] = {"fp32": fp32, "bf16": bf16, "max_relative_gap": gap,
                       "ok": all(math.isfinite(x) for x in fp32 + bf16) and gap < BF16_LOSS_TOLERANCE}
    return out


def parallel_worker(rank: int, world: int, steps: int) -> dict:
    """FSDP2 (dense) x memory parallelism (values) on `world` GPUs, NCCL; the sharded lookup vs the full one."""
    # deferred: a bench target imports what it measures only when it runs
    import torch

    from memlayers.kernels.lookup import embedding_bag
    from memlayers.kernels.sharded_values import ShardedValueTable
    from memlayers.models.transformer import Transformer
    from memlayers.platform.train.fsdp import apply_fsdp
    from memlayers.platform.train.mesh import setup_parallel

    torch.cuda.set_device(rank)
    torch.manual_seed(0)
    model = Transformer(_tiny("memory_plus")).cuda()
    full = model.memory_values.weight.detach().clone()
    memory_parallel = 2 if world % 2 == 0 else 1
    plan = setup_parallel(model, memory_parallel)
    apply_fsdp(model, plan, True, "cuda")
    table = model.memory_values
    slots = torch.randint(0, full.shape[0], (64, 32), device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    weights = torch.softmax(torch.randn(64, 32, device="cuda"), -1)
    sharded_error = None
    if isinstance(table, ShardedValueTable):
        got = table(slots, weights)
        sharded_error = float((got - embedding_bag(full, slots, weights)).abs().max())
    dense = [p for p in model.parameters() if all(p is not v for v in plan.value_params)]
    optimizer = torch.optim.AdamW(dense, lr=1e-3)
    losses = []
    for _ in range(steps):
        tokens = torch.randint(0, 512, (4, 129), device="cuda")
        loss, _ = model.loss(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        plan.sync_value_grads()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return {"losses": losses, "sharded_lookup_error": sharded_error, "memory_parallel": memory_parallel,
            "max_memory_GB": torch.cuda.max_memory_allocated() / 1e9}


def check_parallel(steps: int) -> dict:
    # deferred: a bench target imports what it measures only when it runs
    import torch

    from memlayers.platform.cluster.local_launch import run_local

    world = torch.cuda.device_count()
    ranks = run_local(parallel_worker, world, steps, backend="nccl")
    ok = all(math.isfinite(x) for r in ranks for x in r["losses"]) and all(
        r["sharded_lookup_error"] is None or r["sharded_lookup_error"] < 1e-3 for r in ranks)
    return {"gpus": world, "ranks": ranks, "ok": ok}


def check_decode() -> dict:
    # deferred: a bench target imports what it measures only when it runs
    import torch

    from memlayers.models.generate import generate
    from memlayers.models.transformer import Transformer

    out = {}
    for family in FAMILIES:
        torch.manual_seed(0)
        model = Transformer(_tiny(family)).cuda().eval()
        prompts = torch.randint(2, 512, (16, 32)).tolist()
        generate(model, prompts, 4)
        torch.cuda.synchronize()
        start = time.perf_counter()
        generate(model, prompts, 64)
        torch.cuda.synchronize()
        out[family] = {"batch": 16, "new_tokens": 64, "tokens_per_s": 16 * 64 / (time.perf_counter() - start)}
    return out


def run(args: argparse.Namespace) -> int:
    # deferred: a bench target imports what it measures only when it runs
    import torch

    if not torch.cuda.is_available():
        print("memlayers bench gpu: no CUDA device on this machine, nothing to check "
              "(kernels compile ahead of time with `memlayers bench kernels --compile-only`)")
        return 0
    parts = {"kernels": check_kernels, "bandwidth": check_bandwidth, "bf16": lambda: check_bf16(args.steps),
             "parallel": lambda: check_parallel(args.steps), "decode": check_decode}
    report: dict = {"device": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
                    "torch": torch.__version__}
    failed = []
    for name, check in parts.items():
        try:
            report[name] = check()
        except Exception as error:  # every part reports, whatever one of them raised
            report[name] = {"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()[-2000:]}
            failed.append(name)
            continue
        rows = report[name].values() if name in ("kernels", "bf16") else [report[name]]
        if any(isinstance(r, dict) and r.get("ok") is False for r in rows):
            failed.append(name)
    report["failed"] = failed
    print(json.dumps(report, indent=1))
    return 1 if failed else 0
