"""Fail fast when the cluster cannot hold what a phase asks for (instead of hanging on placement).

Each phase's actors are bundles (a sampler replica: its CPUs and `tensor_parallel_size` GPUs on one
node; a training worker: its CPUs and a GPU). A phase fits when the alive nodes can hold all its
bundles at once; phases run one after another. Autoscaling clusters grow on demand: turn the check
off there with `ray.check_resources=false`.
"""
from __future__ import annotations

from .config import RestemConfig
from .errors import UserError


def _fits(node: dict, bundle: dict[str, float]) -> bool:
    return all(node.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items())


def _take(node: dict, bundle: dict[str, float]) -> None:
    for k, v in bundle.items():
        node[k] -= v


def _place(free: list[dict], bundle: dict[str, float], count: int, strategy: str = "PACK") -> int:
    """Place up to `count` bundles as a placement group of `strategy` would, taking their resources from
    `free`; return how many fit. PACK and SPREAD are soft (any node will do: first-fit); STRICT_PACK needs
    all bundles on one node, STRICT_SPREAD each on a different node. A strict group that does not fit
    whole is placed nowhere (Ray waits for all of its bundles), but the count returned is the most that
    would fit, for the error message."""
    if strategy == "STRICT_PACK":
        best, where = 0, None
        for node in free:
            trial = dict(node)
            n = _place([trial], bundle, count)
            if n > best:
                best, where = n, node
        if best == count and where is not None:
            for _ in range(count):
                _take(where, bundle)
        return best
    if strategy == "STRICT_SPREAD":
        nodes = [n for n in free if _fits(n, bundle)][:count]
        if len(nodes) == count:
            for node in nodes:
                _take(node, bundle)
        return len(nodes)
    placed = 0
    for _ in range(count):
        node = next((n for n in free if _fits(n, bundle)), None)
        if node is None:
            break
        _take(node, bundle)
        placed += 1
    return placed


# The custom resource that marks a node whose pods can run the code sandbox (bubblewrap needs unprivileged
# user namespaces: seccomp and AppArmor unconfined on Kubernetes). Code verifiers, and training workers that
# grade code during M-step validation, ask for a sliver of it, so they are placed only on such nodes.
SANDBOX_RESOURCE = "sandbox"


def sandbox_resources(explicit: dict[str, float] | None, code: bool,
                      cluster: dict[str, float] | None = None) -> dict[str, float]:
    """Custom resources for an actor that may run the code sandbox: `explicit` when given, else
    {sandbox: 1} for code when the cluster advertises `sandbox` anywhere (a local Ray does not: no change)."""
    if explicit is not None:
        return dict(explicit)
    if not code:
        return {}
    if cluster is None:
        import ray

        cluster = ray.cluster_resources()
    return {SANDBOX_RESOURCE: 1.0} if cluster.get(SANDBOX_RESOURCE, 0) > 0 else {}


def phase_needs(cfg: RestemConfig, cluster: dict[str, float] | None = None
                ) -> dict[str, list[tuple[str, dict[str, float], int, str]]]:
    """Each phase's actor groups: (name, bundle, count, placement strategy), as pool.py and training.py
    ask Ray for them (verifiers are separate actors: PACK, i.e. anywhere)."""
    from .verification import resolve_verifier

    s, v, t = cfg.sampling, cfg.verification, cfg.training
    code = resolve_verifier(v.verifier, cfg.task.kind) == "code"
    replica = {"CPU": s.cpus_per_replica} | ({"GPU": float(s.tensor_parallel_size)} if s.use_gpu else {})
    # as training.py asks Ray Train for them: custom resources too (a worker that asks for an `H100` the nodes
    # lack would wait forever, Ray Train retrying its start), and the sandbox's where validation grades code
    worker = t.worker_resources() | sandbox_resources(v.resources, code and bool(t.eval_every_steps), cluster or {})
    verifier = {"CPU": v.cpus_per_worker} | sandbox_resources(v.resources, code, cluster or {})
    return {
        "E-step": [("sampler replica", replica, s.num_replicas, s.placement_strategy),
                   ("verifier", verifier, v.num_workers, "PACK")],
        "M-step": [("training worker", worker, t.num_workers, t.placement_strategy)],
    }


def check_cluster(cfg: RestemConfig, nodes: list[dict[str, float]]) -> None:
    """`nodes`: each alive node's resources, as in `ray.nodes()[i]["Resources"]`."""
    total = {k: sum(n.get(k, 0.0) for n in nodes) for n in nodes for k in n}
    for phase, groups in phase_needs(cfg, total).items():
        free = [dict(n) for n in nodes]
        for name, bundle, count, strategy in groups:
            placed = _place(free, bundle, count, strategy)
            if placed < count:
                want = ", ".join(f"{k} {v:g}" for k, v in bundle.items())
                total = ", ".join(f"{k} {sum(n.get(k, 0.0) for n in nodes):g}" for k in bundle)
                where = {"STRICT_PACK": " on one node (placement_strategy STRICT_PACK)",
                         "STRICT_SPREAD": " on different nodes (placement_strategy STRICT_SPREAD)"}.get(strategy, "")
                raise UserError(
                    f"cluster too small for the {phase}: {count} {name}(s) need {want} each{where}; it holds "
                    f"{placed} (cluster total {total}). Lower the count, add nodes, relax the placement "
                    "strategy, or set ray.check_resources=false on an autoscaling cluster")


def check_ray_cluster(cfg: RestemConfig) -> None:
    import ray

    if cfg.ray.check_resources:
        check_cluster(cfg, [n["Resources"] for n in ray.nodes() if n.get("Alive")])


def check_verifier_on_cluster(verifier: str, v, timeout_s: float = 120.0) -> dict | None:
    """Start one verifier actor (VerificationConfig `v`), placed as the E-step's verifiers will be, when its start
    can fail there: code verification starts its sandbox (a cluster whose verifier nodes cannot run bubblewrap),
    a plug-in runs its `plugin_warmup` (weights that are missing there). Either fails in one line
    before anything is written. The driver's own node (e.g. a head pod without the security settings) is not
    where grading runs, so that is not where the check runs. Returns where it ran ({node, pid}); None when
    nothing needed checking."""
    if verifier != "code" and not v.plugin_warmup:  # (the config allows a warm-up only with a plug-in)
        return None
    import ray

    from .pool import VerifierPool

    from .verification import HELPER_START_S

    pool = VerifierPool(verifier, v.model_copy(update={"num_workers": 1}), max_restarts=0)
    wait_s = timeout_s + (HELPER_START_S if v.plugin_warmup else 0)  # placement, then a warm-up's own limit
    try:
        (where,) = ray.get([a.where.remote() for a in pool.actors], timeout=wait_s)
    except ray.exceptions.GetTimeoutError:
        raise UserError(f"verification: no node could host and start a {verifier} verifier (resources "
                        f"{pool.resources or 'CPU only'}) within {wait_s:g} s") from None
    except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
        cause = str(e).strip().splitlines()[-1]
        own = "UserError: " in cause
        cause = cause.split("UserError: ", 1)[-1]  # the actor's own line
        if verifier == "code":
            raise UserError("verification.verifier: code: the sandbox cannot start on a verifier node: "
                            + cause.removeprefix("verification.verifier: code: ")) from None
        raise UserError(f"{cause} (on a verifier node)" if own else
                        f"verification.plugin_warmup: the verifier could not start on a verifier node: {cause}"
                        ) from None
    finally:
        pool.close()
    return where


def check_run_dir_on_every_node(out, timeout_s: float = 60.0, not_shared=None) -> None:
    """A local --out on a cluster of several nodes: the M-step's workers and the sampler replicas read the
    iteration's data and checkpoints from it, so every node must mount it. A marker file written here is read
    from each other alive node now, rather than a file missing in a worker after a whole E-step. Nodes that join
    later (autoscaling) cannot be checked. `not_shared(out, missing, nodes)`: the refusal's text, if not --out's."""
    import uuid
    from pathlib import Path

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    others = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes() if n.get("Alive") and n["NodeID"] != here}
    if not others:
        return
    token = uuid.uuid4().hex
    # in the run directory, or the folder it will be made in (a check that fails leaves nothing behind)
    where = next(p for p in [Path(out).resolve(), *Path(out).resolve().parents] if p.is_dir())
    marker = where / f".restem-node-check-{token[:8]}"
    marker.write_text(token)
    try:
        sees = ray.remote(num_cpus=0)(_holds)
        refs = [sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(str(marker), token)
                for n in others]
        try:
            seen = ray.get(refs, timeout=timeout_s)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError) as e:  # e.g. a node that died meanwhile
            print(f"[restem] could not check that every node sees --out {out}: {type(e).__name__}")
            return
    finally:
        marker.unlink(missing_ok=True)
    missing = [addr for addr, ok in zip(others.values(), seen) if not ok]
    if missing:
        raise UserError((not_shared or run_dir_not_shared)(out, missing, len(others) + 1))


# attention kernels transformers takes from a package of their own, which the GPU image carries only when built with
# it (docker/Dockerfile.gpu's FLASH_ATTN_WHEELS), or else from a Hub kernel through the `kernels` package
ATTENTION_PACKAGES = {"flash_attention_2": ("flash_attn", "kernels"),
                      "flash_attention_3": ("flash_attn_interface", "kernels")}


def check_attention_on_cluster(cfg: RestemConfig, timeout_s: float = 60.0) -> None:
    """`training.attn_implementation: flash_attention_2` on nodes without flash-attn: transformers refuses it in
    every rank at the first M-step's model load, after the baseline evaluation and a whole E-step (and a RayJob
    then retries the same). Looked for now on every alive node that can host a training worker (its GPU and custom
    resources), by a task that takes no resources; transformers' fallback to a Hub kernel (the `kernels` package)
    counts as found. Nodes that join later (autoscaling) or do not answer cannot be checked."""
    packages = ATTENTION_PACKAGES.get(cfg.training.attn_implementation or "")
    if packages is None:
        return
    package = packages[0]
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    needs = {k for k in cfg.training.worker_resources() if k != "CPU"}  # (GPU when use_gpu, custom resources)
    nodes = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes() if n.get("Alive")
             and all(n.get("Resources", {}).get(k, 0) > 0 for k in needs)}
    if not nodes:
        print(f"[restem] note: no node that can host a training worker is up yet to look for {package} on "
              "(training.attn_implementation)", flush=True)
        return
    has = ray.remote(num_cpus=0)(_has_package)
    refs = {has.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(*packages): addr
            for n, addr in nodes.items()}
    done, late = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    missing, unknown = [], len(late)
    for ref in done:
        try:
            if not ray.get(ref):
                missing.append(refs[ref])
        except ray.exceptions.RayError:  # a node that died or drained meanwhile: not known
            unknown += 1
    for ref in late:
        ray.cancel(ref, force=True)
    if unknown:
        print(f"[restem] could not look for {package} on {unknown} of {len(nodes)} node(s)", flush=True)
    if missing:
        raise UserError(f"training.attn_implementation: {cfg.training.attn_implementation} needs the {package} "
                        f"package, which {len(missing)} of {len(nodes)} node(s) that can host a training worker lack "
                        f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): build the GPU image with "
                        "FLASH_ATTN_WHEELS (docker/Dockerfile.gpu), or use sdpa")


def _has_package(*names: str) -> bool:
    """Whether any of the packages is installed in this node's worker environment (the job's runtime_env too)."""
    import importlib.util

    return any(importlib.util.find_spec(name) is not None for name in names)


def _holds(path: str, token: str) -> bool:
    try:
        with open(path) as f:
            return f.read() == token
    except OSError:
        return False


def run_dir_not_shared(out, missing: list[str], nodes: int) -> str:
    return (f"--out {out}: {len(missing)} of the cluster's {nodes} nodes do not see it (e.g. {missing[0]}); the "
            f"training workers and sampler replicas read each iteration's data and checkpoints from it: give "
            f"--out a folder every node mounts (e.g. /shared/runs/NAME) or an object-store URI")
