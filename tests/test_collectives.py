"""GPU-only mistakes made visible on CPU.

The first GPU M-step crashed on `dist.all_reduce(torch.tensor([...]))`: NCCL reduces only GPU tensors, and
gloo, which every CPU run here uses, accepts CPU tensors, so no CPU run could fail on it. These tests hold the
package to the rule that prevents it: the M-step's own collectives go through `sum_over_ranks`, which puts
its tensor on the engine's device, and every tensor the training loop creates names its device.
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import free_port

PKG = Path(__file__).resolve().parent.parent / "restem_ray"
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all",
               "all_to_all_single", "gather", "scatter", "send", "recv", "isend", "irecv", "all_reduce_coalesced"}
FACTORIES = {"tensor", "zeros", "ones", "full", "empty", "arange", "rand", "randn", "as_tensor"}


def _dist_aliases(tree: ast.AST) -> set[str]:
    """Names under which a module refers to torch.distributed (`import torch.distributed as dist`, ...)."""
    names = {"torch.distributed"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.asname for a in node.names if a.name == "torch.distributed" and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            names |= {a.asname or a.name for a in node.names if a.name == "distributed"}
    return names


def _collective_calls(path: Path) -> list[tuple[str, int]]:
    """(enclosing function, line) of every torch.distributed collective called in a file."""
    tree = ast.parse(path.read_text())
    aliases = _dist_aliases(tree)
    out = []

    def visit(node, func):
        for child in ast.iter_child_nodes(node):
            f = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else func
            if isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute) and \
                    child.func.attr in COLLECTIVES and ast.unparse(child.func.value) in aliases:
                out.append((func, child.lineno))
            visit(child, f)

    visit(tree, "<module>")
    return out


def test_only_sum_over_ranks_calls_a_collective():
    calls = {p.name: _collective_calls(p) for p in sorted(PKG.rglob("*.py"))}
    stray = [(name, fn, line) for name, cs in calls.items() for fn, line in cs if fn != "sum_over_ranks"]
    assert not stray, f"collectives outside training.sum_over_ranks (their tensors' device is unchecked): {stray}"
    assert [fn for fn, _ in calls["training.py"]] == ["sum_over_ranks"]


def test_the_old_checkpoint_line_would_be_caught(tmp_path):
    """The scan does catch the line that crashed on NCCL (so the test above can fail)."""
    old = ("import torch\nimport torch.distributed as dist\n\nclass MStep:\n    def _checkpoint(self):\n"
           "        counts = torch.tensor([1.0, 2.0], dtype=torch.float64)\n        dist.all_reduce(counts)\n")
    path = tmp_path / "old.py"
    path.write_text(old)
    assert _collective_calls(path) == [("_checkpoint", 7)]


def test_training_loop_tensors_name_their_device():
    """Inside MStep every tensor factory gets device=...: a CPU default there is a GPU-only bug."""
    tree = ast.parse((PKG / "training.py").read_text())
    (mstep,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MStep"]
    bare = [(n.lineno, ast.unparse(n)) for n in ast.walk(mstep)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in FACTORIES
            and ast.unparse(n.func.value) == "torch" and not any(k.arg == "device" for k in n.keywords)]
    assert not bare, bare


def test_sum_over_ranks_needs_a_device_and_sums_in_float64(monkeypatch):
    import torch.distributed as dist

    from restem_ray.training import sum_over_ranks

    with pytest.raises(TypeError):
        sum_over_ranks([1.0])  # the device is not optional
    seen = []

    def fake_all_reduce(t):
        seen.append((t.device, t.dtype))
        t.mul_(2)  # two ranks holding the same values

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    assert sum_over_ranks([3, 2**53], device=torch.device("cpu")) == [6.0, 2.0**54]
    assert seen == [(torch.device("cpu"), torch.float64)]


def test_a_backend_without_cpu_support_refuses_the_old_tally():
    """NCCL's refusal reproduced on CPU: a process group whose only backend serves CUDA tensors gives the error
    the first GPU M-step died of, for the tensor the old line built. (This machine has no CUDA device to build
    the accepted tally on; that sum_over_ranks puts its tensor on the device it is given, and that the M-step gives
    it engine.device, the tests above check.)"""
    code = (
        "import os, torch, torch.distributed as dist\n"
        f"os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT='{free_port()}')\n"
        "dist.init_process_group(backend='cuda:gloo', rank=0, world_size=1)\n"
        "try:\n"
        "    dist.all_reduce(torch.tensor([1.0, 2.0], dtype=torch.float64))\n"
        "except RuntimeError as e:\n"
        "    print('refused:', e)\n"
        "dist.destroy_process_group()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "refused: No backend type associated with device type cpu" in out.stdout, out.stdout + out.stderr


def test_the_engine_runs_on_the_gpu_ray_train_made_current_not_on_local_rank(monkeypatch):
    """Ray Train makes the worker's GPU the current CUDA device; DeepSpeed (its engine, and ZeRO-3's zero.Init)
    takes cuda:LOCAL_RANK, another GPU where a worker sees only its own (index 0 at local rank 1) or a node lists
    more than 10. The M-step points LOCAL_RANK at the current device before either reads it, and the installed
    DeepSpeed's engine then runs there."""
    import os
    from types import SimpleNamespace

    import deepspeed.runtime.engine as engine_module

    from restem_ray.training import pin_local_rank_to_current_device

    monkeypatch.setenv("LOCAL_RANK", "1")
    pin_local_rank_to_current_device(use_gpu=False)  # CPU training: left as the launcher set it
    assert os.environ["LOCAL_RANK"] == "1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # the worker's own GPU, the only one it sees
    pin_local_rank_to_current_device(use_gpu=True)
    assert os.environ["LOCAL_RANK"] == "0"

    chosen = []

    class Cuda:
        def set_device(self, index):
            chosen.append(index)

        def device_name(self, index=None):
            return "cuda" if index is None else f"cuda:{index}"

    monkeypatch.setattr(engine_module, "get_accelerator", lambda: Cuda())
    monkeypatch.setattr(engine_module.dist, "get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(engine_module.dist, "get_rank", lambda *a, **k: 1)
    engine = SimpleNamespace()
    engine_module.DeepSpeedEngine._configure_with_arguments(engine, None, None)
    engine_module.DeepSpeedEngine._set_distributed_vars(engine, None)
    assert chosen == [0] and engine.device == torch.device("cuda:0")
