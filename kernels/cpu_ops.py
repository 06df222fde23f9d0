"""The C++ CPU ops of the memory layers (`cpu_ops.cpp`), built once per machine and cached.

On CPU a memory layer's step is dominated by per-row overheads of generic torch ops (`topk` over
short rows, dense scatters of sparse gradients, many small element-wise kernels). The ops in
`cpu_ops.cpp` do that work in one pass each:

- `topk_merge`: both sub-key top-ks and the exact candidate-pair merge of a product-key search;
- `search_forward`: the same with the sub-key scores computed row by row inside the op;
- `search_backward`: the sparse gradient of the selected scores w.r.t. queries and sub-keys;
- `rms_rows`, `rms_rows_backward`: the qk-norm of the queries and sub-keys (unit RMS per row, a gain)
  and its gradients, one pass each;
- `bag_weight_grad`: the embedding bag's weight gradient (a dot product per read);
- `sort_reads`: a stable counting sort of the reads by slot (the segments of the value gradient);
- `bag_value_grad`: the bag's row-sparse value gradient in one pass, summed in the segments' order;
- `lazy_adam_rows_`, `row_adagrad_rows_`: `LazyAdam`'s and `RowAdagrad`'s updates of the rows
  with a gradient, in place, without gathered copies of the rows;
- `adamw_`: `torch.optim.AdamW`'s step on a group of dense parameters in one call, in its arithmetic
  (`memlayers.kernels.dense_adamw`);
- `slot_usage_update_`: the slot-usage counts of `memlayers.kernels.usage`, one pass per step.

The extension is compiled with `torch.utils.cpp_extension.load_inline` (gcc + ninja) into a
per-user cache directory keyed by the source, torch and Python versions
(`$MEMLAYERS_EXTENSIONS_DIR`, else `$XDG_CACHE_HOME/memlayers/extensions`, else
`~/.cache/memlayers/extensions`); a second process finds it built. Without a compiler the build
fails once, a warning says so, and every caller keeps the torch path.

`MEMLAYERS_CPU_OPS` selects, at every call: "auto" (default: the C++ ops where they apply),
"torch" (the torch path everywhere: the reference and the fallback), "cpp" (the C++ ops, an
error if they cannot be built). The ops apply to CPU tensors of fp32/fp64 only; CUDA tensors and
other dtypes always take the torch/Triton path.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

MODES = ("auto", "torch", "cpp")
ENV = "MEMLAYERS_CPU_OPS"
SOURCE = Path(__file__).with_name("cpu_ops.cpp")
FUNCTIONS = ["topk_merge", "search_forward", "search_backward", "rms_rows", "rms_rows_backward", "bag_forward",
             "bag_weight_grad",
             "sort_reads", "bag_value_grad",
             "lazy_adam_rows_", "adamw_", "row_adagrad_rows_", "slot_usage_update_"]
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]  # native: the cache key names the CPU

_state: dict[str, ModuleType | None] = {}


def mode() -> str:
    value = os.environ.get(ENV, "auto")
    if value not in MODES:
        raise ValueError(f"{ENV} must be one of {MODES}, got {value!r}")
    return value


def cache_dir() -> Path:
    """Where the built extension lives: one folder per source/torch/Python version."""
    root = os.environ.get("MEMLAYERS_EXTENSIONS_DIR")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = str(Path(base) / "memlayers" / "extensions")
    tag = hashlib.sha256("\n".join([SOURCE.read_text(), torch.__version__, sys.version, *FLAGS, _cpu()])
                         .encode()).hexdigest()
    return Path(root) / f"cpu_ops_{tag[:16]}"


def _cpu() -> str:
    """The CPU model and its feature flags (built code is specific to them: -march=native)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return " ".join(os.uname())
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))


BUILD_TIMEOUT_S = 600.0  # waiting longer for another process's build falls back to the torch path


def _build() -> ModuleType:
    # deferred: building pulls in setuptools/ninja machinery only when the ops are first used
    from torch.utils.cpp_extension import load_inline

    if shutil.which("ninja") is None:  # the `ninja` package's binary, when its venv is not on PATH
        import ninja  # deferred: only needed to locate the binary

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    from filelock import FileLock  # deferred: only a build needs the lock

    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    # torch's own build lock is a plain file that a build killed half-way leaves behind, after which
    # every later process waits for it forever. Our flock dies with its holder: under it, no other
    # memlayers process is building, so a torch lock file still there is stale and can go.
    with FileLock(str(directory / ".memlayers-build.lock"), timeout=BUILD_TIMEOUT_S):
        (directory / "lock").unlink(missing_ok=True)
        return load_inline(name=f"memlayers_{directory.name}", cpp_sources=[SOURCE.read_text()], functions=FUNCTIONS,
                           extra_cflags=FLAGS, extra_ldflags=["-fopenmp"], build_directory=str(directory),
                           verbose=False)


def ops() -> ModuleType | None:
    """The built extension, or None (mode "torch", or the build failed: warned once)."""
    selected = mode()
    if selected == "torch":
        return None
    if "module" not in _state:
        try:
            _state["module"] = _build()
        except Exception as exc:  # no compiler, no ninja, a failed build: keep the torch path
            _state["module"] = None
            _state["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
            warnings.warn(f"memlayers: the C++ CPU ops could not be built ({_state['error']}); "
                          f"using the torch path (set {ENV}=torch to silence this)", RuntimeWarning, stacklevel=2)
    if _state["module"] is None and selected == "cpp":
        raise RuntimeError(f"{ENV}=cpp but the C++ CPU ops could not be built: {_state.get('error')}")
    return _state["module"]


def applies(*tensors: torch.Tensor) -> ModuleType | None:
    """The extension when every tensor is a CPU fp32/fp64 (or integer) tensor and the ops are on, else None."""
    for t in tensors:
        if t.device.type != "cpu" or (t.is_floating_point() and t.dtype not in (torch.float32, torch.float64)):
            return None
    return ops()
