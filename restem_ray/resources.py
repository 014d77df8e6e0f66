"""Fail fast when the cluster cannot hold what a phase asks for (instead of hanging on placement).

Each phase's actors are bundles (a sampler replica: its CPUs and `tensor_parallel_size` GPUs on one
node; a training worker: its CPUs and a GPU). A phase fits when the alive nodes can hold all its
bundles at once; phases run one after another. Autoscaling clusters grow on demand: turn the check
off there with `ray.check_resources=false`.
"""
from __future__ import annotations

from .config import RestemConfig
from .errors import UserError


def _place(free: list[dict], bundle: dict[str, float], count: int) -> int:
    """Place up to `count` bundles first-fit, taking their resources from `free`; return how many fit."""
    placed = 0
    for _ in range(count):
        node = next((n for n in free if all(n.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items())), None)
        if node is None:
            break
        for k, v in bundle.items():
            node[k] -= v
        placed += 1
    return placed


def phase_needs(cfg: RestemConfig) -> dict[str, list[tuple[str, dict[str, float], int]]]:
    s, v, t = cfg.sampling, cfg.verification, cfg.training
    replica = {"CPU": s.cpus_per_replica} | ({"GPU": float(s.tensor_parallel_size)} if s.use_gpu else {})
    worker = {"CPU": t.cpus_per_worker} | ({"GPU": 1.0} if t.use_gpu else {})
    return {
        "E-step": [("sampler replica", replica, s.num_replicas),
                   ("verifier", {"CPU": v.cpus_per_worker}, v.num_workers)],
        "M-step": [("training worker", worker, t.num_workers)],
    }


def check_cluster(cfg: RestemConfig, nodes: list[dict[str, float]]) -> None:
    """`nodes`: each alive node's resources, as in `ray.nodes()[i]["Resources"]`."""
    for phase, groups in phase_needs(cfg).items():
        free = [dict(n) for n in nodes]
        for name, bundle, count in groups:
            placed = _place(free, bundle, count)
            if placed < count:
                want = ", ".join(f"{k} {v:g}" for k, v in bundle.items())
                total = ", ".join(f"{k} {sum(n.get(k, 0.0) for n in nodes):g}" for k in bundle)
                raise UserError(
                    f"cluster too small for the {phase}: {count} {name}(s) need {want} each; it holds "
                    f"{placed} (cluster total {total}). Lower the count, add nodes, or set "
                    "ray.check_resources=false on an autoscaling cluster")


def check_ray_cluster(cfg: RestemConfig) -> None:
    import ray

    if cfg.ray.check_resources:
        check_cluster(cfg, [n["Resources"] for n in ray.nodes() if n.get("Alive")])
