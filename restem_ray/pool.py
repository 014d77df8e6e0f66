"""Ray hosting for the E-step: sampler replicas and a verifier pool, streaming.

Each sampler replica is a Ray actor owning one vLLM engine (`Sampler`); the verifier pool is a set of
CPU actors (`Verifier`). A chunk of problems goes to a free replica; its samples go straight from the
replica to a verifier actor (the object reference is passed, not fetched by the driver), so grading
overlaps generation. Replicas stay up between calls (evaluation of policy t and the E-step that
samples from it share one engine start) and are ended with `close()` before the M-step needs the
accelerators.

Why not Ray Data here: a Ray Data pipeline builds its actor pool per dataset execution, so every
evaluation split and every E-step would pay the engine start again (~15 s on CPU, minutes for a
large model on GPUs); persistent replicas pay it once per policy.
"""
from __future__ import annotations

import time
from typing import Callable

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from tqdm import tqdm

from .config import SamplingConfig, VerificationConfig
from .errors import RunError
from .faults import trace_call
from .sampling import DRAW, Sampler, SampleSpec, draw_of
from .verification import Verifier

WATCH_S = 10.0  # how often a waiting E-step looks at its replicas' placement groups
CONTROL = "control"  # a sampler replica's concurrency group for `close`, beside its calls


class _GradeHost:
    """Verifier actor body: joins problems with their samples and grades them."""

    def __init__(self, verifier: str, config: VerificationConfig):
        t0 = time.perf_counter()
        self.verifier = Verifier(verifier, config)  # a code verifier starts its sandbox here
        self.startup_s = time.perf_counter() - t0

    def ready(self) -> float:
        return self.startup_s

    def where(self) -> dict:
        import os

        return {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def grade(self, problems: list[dict], samples: list[dict]) -> list[dict]:
        # without an adaptive round's draw: plug-ins see the problem as written
        trace_call("grade", ids=sorted({s["id"] for s in samples}), rows=len(samples))  # tests see who graded what
        by_id = {p["id"]: {k: v for k, v in p.items() if k != DRAW} for p in problems}
        rows = self.verifier.grade_batch([{**by_id[s["id"]], **s} for s in samples])
        keep = set().union(*samples) | {"prompt", "train_prompt", "reward", "verdict"}  # (every row's own keys)
        return [{k: v for k, v in r.items() if k in keep} for r in rows]


class VerifierPool:
    """`num_workers` CPU actors, each hosting one `Verifier` (for code: one warm sandbox each).

    Used inside the E-step (fed by sampler replicas) and on its own by `restem-ray verify` / `eval`.
    Actors are restarted by Ray after a crash and their calls re-run (`max_restarts`).
    """

    def __init__(self, verifier: str, config: VerificationConfig, max_restarts: int = 3):
        from .resources import sandbox_resources

        retry = dict(max_restarts=max_restarts, max_task_retries=max_restarts)
        self.resources = sandbox_resources(config.resources, verifier == "code")  # nodes that can run bubblewrap
        self._cls = ray.remote(_GradeHost).options(num_cpus=config.cpus_per_worker, resources=self.resources,
                                                   **retry)
        self._args = (verifier, config)
        self.config = config
        self.actors = [self._cls.remote(verifier, config) for _ in range(config.num_workers)]
        self._inflight: list[list] = [[] for _ in self.actors]  # each actor's unfinished grade calls
        self._turn = 0

    def grow(self) -> bool:
        """Add one verifier actor if below `max_workers` and a node has a free CPU slot for it (elastic
        clusters: a node that joins mid-E-step takes grading work). Returns True if one was added."""
        limit = self.config.max_workers or self.config.num_workers
        free = ray.available_resources()
        need = {"CPU": self.config.cpus_per_worker, **self.resources}
        if len(self.actors) >= limit or any(free.get(k, 0) < v for k, v in need.items()):
            return False
        self.actors.append(self._cls.remote(*self._args))
        self._inflight.append([])
        return True

    def ready(self) -> list[float]:
        """Wait for every actor; returns each one's verifier start-up seconds (sandbox warm-up)."""
        return ray.get([a.ready.remote() for a in self.actors])

    def submit(self, problems: list[dict], samples) -> ray.ObjectRef:
        """Grade `samples` (a list or an object ref to one) against `problems`, on the actor with the fewest
        unfinished calls (ties in turn). A call queued on an actor cannot move: round-robin left chunks waiting
        behind one actor's slow code chunk (programs that run to their timeout) while other actors were idle."""
        return self.submit_many([(problems, samples)])[0]

    def submit_many(self, calls: list[tuple[list[dict], object]]) -> list[ray.ObjectRef]:
        """`submit` for several (problems, samples) at once: finished calls are looked up once (one `ray.wait`
        over every call in flight, not one per actor and call: 256 actors x 15,000 calls was minutes of driver)."""
        pending = [r for refs in self._inflight for r in refs]
        if pending:
            done, _ = ray.wait(pending, num_returns=len(pending), timeout=0, fetch_local=False)
            if done:
                done = set(done)
                for refs in self._inflight:
                    refs[:] = [r for r in refs if r not in done]
        out = []
        n = len(self.actors)
        for problems, samples in calls:
            i = min(range(n), key=lambda k: (len(self._inflight[(self._turn + k) % n]), k))
            i = (self._turn + i) % n
            self._turn = (i + 1) % n
            ref = self.actors[i].grade.remote(problems, samples)
            self._inflight[i].append(ref)
            out.append(ref)
        return out

    def grade_all(self, problems: dict[str, dict], samples: list[dict], chunk_size: int = 16,
                  desc: str | None = None) -> list[dict]:
        """Grade every sample (each carries `id`); rows come back in input order. At most two chunks per actor
        are in flight, so each next chunk goes to an actor that is free or nearly so."""
        chunks = chunked(samples, chunk_size)
        todo = list(range(len(chunks)))[::-1]
        pending: dict = {}
        out: list = [None] * len(chunks)
        bar = tqdm(total=len(samples), desc=desc, unit="sample", mininterval=1, disable=desc is None)
        while todo or pending:
            while todo and len(pending) < 2 * len(self.actors):
                n = todo.pop()
                pending[self.submit([problems[i] for i in {s["id"] for s in chunks[n]}], chunks[n])] = n
            done, _ = ray.wait(list(pending), num_returns=1)
            n = pending.pop(done[0])
            try:
                out[n] = ray.get(done[0])
            except ray.exceptions.RayActorError as e:  # a verifier that died past its restarts (OOM, lost node)
                bar.close()
                raise RunError(f"{desc or 'grading'}: chunk {n} failed after the allowed verifier restarts: "
                               f"{_cause(e)}") from None
            bar.update(len(out[n]))
        bar.close()
        return [r for rows in out for r in rows]

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors, self._inflight = [], []


def chunked(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


GRADE_PIECE = 64  # samples per verifier call at least (a call costs the driver and Ray ~1 ms)


def piece_sizes(chunk: list[dict], spec: SampleSpec, verifiers: int, least: int = GRADE_PIECE) -> list[int]:
    """Problems per piece of one sampler call's rows, in order: whole problems, about an even share of the call's
    samples per verifier actor but at least `least` samples a piece (a problem drawing more is a piece alone)."""
    draws = [draw_of(p, spec)[1] for p in chunk]
    target = max(least, -(-sum(draws) // max(1, verifiers)))
    sizes, n = [], 0
    for k in draws:
        if sizes and n + k <= target:
            sizes[-1] += 1
            n += k
        else:
            sizes.append(1)
            n = k
    return sizes


class EStepPool:
    """Sampler replicas + verifier actors for one policy checkpoint.

    Failures: a replica or verifier that dies (killed, OOM, node lost) is restarted by Ray up to
    `max_restarts` times and its unfinished calls are re-run on the new actor (`max_task_retries`), or, while
    other replicas are live, moved to them (`_check_restarts`): a chunk's samples are delivered exactly once
    (a moved call that ran anyway is not graded). Past the limit the E-step ends with a `RunError`.
    """

    def __init__(self, model: str, sampling: SamplingConfig, verification: VerificationConfig, *,
                 verifier: str, seed: int = 0, trust_remote_code: bool = False):
        self.model, self.sampling = model, sampling
        self.trust_remote_code = trust_remote_code  # (model.trust_remote_code: vLLM runs the folder's own code)
        self.grade_piece = GRADE_PIECE
        self.samplers: list = []
        self.verifiers: VerifierPool | None = None
        self.group = None
        self.extra_groups: list = []   # one single-bundle placement group per replica added later
        self._starting: dict = {}      # ready() ref -> replica whose engine is starting
        self._started_at: dict = {}    # ready() ref of an added replica -> (when it was asked to start, its group)
        self._placing = None           # (group, its ready() ref, since): a replica's bundle being placed
        self.nodes: list | None = None  # the replicas' nodes, once every engine is up
        try:  # a start that fails or is interrupted (Ctrl-C while engines load) leaves no actor or reservation
            self._start(verifier, verification, seed)
        except BaseException as e:
            if self.nodes is None and not isinstance(e, RunError):  # interrupted while engines load: killed, not
                self._starting.update({id(a): a for a in self.samplers})  # asked to close (that waits for them)
                self.samplers = []
            self.close()
            raise

    def _start(self, verifier: str, verification: VerificationConfig, seed: int) -> None:
        model, sampling = self.model, self.sampling
        retry = dict(max_restarts=sampling.max_restarts, max_task_retries=sampling.max_restarts)
        # One placement group for all replicas (OpenRLHF): a bundle per replica holding its CPUs and its
        # tensor_parallel_size GPUs on one node, reserved before any engine starts; the strategy decides
        # whether replicas pack onto few nodes or spread over many.
        gpus = sampling.tensor_parallel_size if sampling.use_gpu else 0
        bundle = {"CPU": sampling.cpus_per_replica} | ({"GPU": gpus} if gpus else {})
        group = placement_group([bundle] * sampling.num_replicas, strategy=sampling.placement_strategy)
        what = f"{sampling.num_replicas} sampler replica(s) of {bundle} with strategy {sampling.placement_strategy}"
        reserve(group, sampling.placement_timeout_s, what, "sampling.placement_timeout_s")
        self.group = group
        # `close` has a thread of its own: in the default group it would queue behind the calls in flight (an
        # error or Ctrl-C mid-E-step), and a replica killed after the 30 s wait leaves its engine's processes.
        sampler_cls = ray.remote(concurrency_groups={CONTROL: 1})(Sampler)
        kwargs = dict(sampling.engine_kwargs)
        if self.trust_remote_code:
            kwargs["trust_remote_code"] = True
        if sampling.tensor_parallel_size > 1:
            kwargs.setdefault("tensor_parallel_size", sampling.tensor_parallel_size)
        self._grow_args = (sampler_cls, bundle, retry, kwargs, seed, gpus)
        self._add_failed = False       # an added replica failed or hung at start: none more is added this E-step
        self._last_grow = 0.0
        self._unplaced_since: dict = {}  # placement group id -> when it was first seen without its nodes
        self._last_check = 0.0
        self._restarting_since: dict = {}  # replica actor id -> when it was first seen restarting, placed
        self._last_restart_check = 0.0
        # A different seed per replica (OpenRLHF): per-problem seeds make samples batch-independent anyway.
        self.samplers = [
            sampler_cls.options(num_cpus=sampling.cpus_per_replica, num_gpus=gpus, **retry,
                                max_concurrency=sampling.calls_per_replica,
                                scheduling_strategy=PlacementGroupSchedulingStrategy(
                                    self.group, placement_group_bundle_index=i,
                                    placement_group_capture_child_tasks=True))
            .remote(model, kwargs, seed + i, sampling.use_gpu, exit_on_engine_death=True)
            for i in range(sampling.num_replicas)]
        self.verifiers = VerifierPool(verifier, verification, sampling.max_restarts)
        refs = [s.ready.remote() for s in self.samplers]
        # vLLM's own waits for an engine core and its tensor-parallel workers have no limit: a start hung in NCCL
        # set-up or a stuck weight read would hold the run for good
        deadline, late = time.monotonic() + sampling.start_timeout_s, list(refs)
        while late and time.monotonic() < deadline:
            done, late = ray.wait(late, timeout=max(0.0, deadline - time.monotonic()))
            try:
                ray.get(done)  # an engine's start error surfaces as it happens, not after the others' start
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
                self._split_starting(refs, late)
                raise RunError(f"a vLLM sampler replica could not start on {model}: {_cause(e)}") from None
        if late:
            self._split_starting(refs, late)
            raise RunError(f"{len(late)} of {len(refs)} vLLM sampler replica(s) did not start on {model} within "
                           f"sampling.start_timeout_s ({sampling.start_timeout_s:g} s; a URI model is copied to "
                           "each node within it too)")
        self.nodes = ray.get(refs)

    @property
    def call_slots(self) -> int:
        """Calls the replicas take at once (each replica's calls_per_replica)."""
        return max(1, len(self.samplers)) * self.sampling.calls_per_replica

    def _split_starting(self, refs: list, late: list) -> None:
        """Replicas whose engine is still starting leave `samplers` for `_starting`: close() kills them rather than
        ask them to close, which would wait for their engine to load."""
        late = set(late)
        self._starting = {r: a for r, a in zip(refs, self.samplers) if r in late}
        self.samplers = [a for r, a in zip(refs, self.samplers) if r not in late]

    def _grow(self) -> None:
        """Elastic pools: while work is queued, start another replica (up to `sampling.max_replicas`) when a
        node has room for its bundle, e.g. a worker node that joined mid-E-step, and another verifier (up to
        `verification.max_workers`). A new replica takes work once its engine is up; nothing is moved.
        Never waits: a placement group asked for is checked at later calls and given up after 10 s (free
        resources summed over nodes may hold a bundle that no single node holds)."""
        now = time.monotonic()
        if self._placing is not None:
            group, ready_ref, since = self._placing
            if ray.wait([ready_ref], timeout=0)[0]:
                self._placing = None
                self._start_replica(group)
            elif now - since > 10:
                remove_placement_group(group)
                self._placing = None
                self._last_grow = now  # asked again 2 s on: a node may have freed up meanwhile
        if now - self._last_grow < 2.0:
            return
        self._last_grow = now
        self.verifiers.grow()
        limit = self.sampling.max_replicas or self.sampling.num_replicas
        if self._add_failed or self._placing is not None or len(self.samplers) + len(self._starting) >= limit:
            return
        bundle = self._grow_args[1]
        avail = ray.available_resources()
        if any(avail.get(k, 0) < v for k, v in bundle.items()):
            return
        group = placement_group([bundle], strategy="PACK")
        self._placing = (group, group.ready(), now)

    def _start_replica(self, group) -> None:
        cls, bundle, retry, kwargs, seed, gpus = self._grow_args
        i = len(self.samplers) + len(self._starting)
        replica = cls.options(num_cpus=self.sampling.cpus_per_replica, num_gpus=gpus, **retry,
                              max_concurrency=self.sampling.calls_per_replica,
                              scheduling_strategy=PlacementGroupSchedulingStrategy(
                                  group, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)
                              ).remote(self.model, kwargs, seed + i, self.sampling.use_gpu, exit_on_engine_death=True)
        self.extra_groups.append(group)
        ref = replica.ready.remote()
        self._starting[ref], self._started_at[ref] = replica, (time.monotonic(), group)

    def _drop_late_starts(self) -> None:
        """An added replica's start is bounded by sampling.start_timeout_s as the first replicas' are (vLLM's own
        waits have no limit); one past it is dropped, and the E-step goes on with the others."""
        now = time.monotonic()
        for ref, (since, _) in list(self._started_at.items()):
            if ref in self._starting and now - since > self.sampling.start_timeout_s:
                self._drop_added(ref, f"did not start within sampling.start_timeout_s "
                                      f"({self.sampling.start_timeout_s:g} s)")

    def _drop_added(self, ref, why: str) -> None:
        """An added replica that failed or hung at start goes, with its bundle (the accelerators are free again);
        no other is added this E-step: on the next node with room, or the same one, it would likely fail alike and
        hold its bundle while it did."""
        replica = self._starting.pop(ref)
        _, group = self._started_at.pop(ref, (None, None))
        ray.kill(replica)
        if group is not None:
            remove_placement_group(group)
            self.extra_groups = [g for g in self.extra_groups if g.id != group.id]
        if self._placing is not None:  # a next one's bundle being placed: not started either
            remove_placement_group(self._placing[0])
            self._placing = None
        self._add_failed = True
        tqdm.write(f"[restem] an added sampler replica {why} and was dropped; no more are added this E-step")

    def _started(self, ref, free: list) -> None:
        try:
            self.nodes.append(ray.get(ref))
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
            self._drop_added(ref, f"could not start ({_cause(e)})")  # the others carry on
            return
        replica = self._starting.pop(ref)
        self._started_at.pop(ref, None)
        self.samplers.append(replica)
        free += [replica] * self.sampling.calls_per_replica

    def run(self, chunks: list[list[dict]], spec: SampleSpec, *, on_chunk: Callable[[int, list[dict]], None],
            on_piece: Callable[[int, list[dict]], None] | None = None, desc: str = "sample") -> None:
        """Generate and grade every chunk; `on_chunk(index, graded_rows)` is called as each finishes, and
        `on_piece(index, rows)` for each piece of it one verifier actor graded (to judge that actor's grades)."""
        todo = list(enumerate(chunks))
        # calls in flight per replica, run at once into its engine (sampling.Sampler): the next call's requests join
        # the batch while the last call's longest samples decode
        free = list(self.samplers) * self.sampling.calls_per_replica
        gen_of: dict = {}   # a call's first return -> (chunk index, chunk, replica, [(its problems, return)] per piece)
        grading: dict = {}  # a piece's grade call -> (chunk index, chunk, piece number, the chunk's attempt)
        attempt: dict = {}  # chunk index -> the attempt its graded pieces belong to (a chunk sent again starts anew)
        parts: dict = {}    # chunk index -> each piece's graded rows (None until graded)
        unavailable: dict = {}  # chunk index -> times its replica was unavailable mid-call
        moved: dict = {}  # call -> its replica: a call taken off a replica Ray is restarting, run elsewhere instead
        down: set = set()  # ids of the replicas Ray is restarting, as last looked at
        total = sum(draw_of(p, spec)[1] for c in chunks for p in c)
        bar = tqdm(total=total, desc=desc, unit="sample", mininterval=1, dynamic_ncols=True)
        passed = tokens = 0
        while todo or gen_of or grading:
            while todo:
                slot = next((i for i, r in enumerate(free) if _id(r) not in down), None)
                if slot is None:
                    break
                idx, chunk = todo.pop(0)
                replica = free.pop(slot)
                sizes = piece_sizes(chunk, spec, len(self.verifiers.actors), self.grade_piece)
                sent = [{k: p[k] for k in ("id", "prompt", DRAW) if k in p} for p in chunk]  # (what a replica reads)
                if len(sizes) == 1:
                    refs = [replica.generate.remote(sent, spec)]
                else:
                    refs = list(replica.generate_pieces.options(num_returns=len(sizes)).remote(sent, spec, sizes))
                starts = [sum(sizes[:k]) for k in range(len(sizes))]
                pieces = [(chunk[a: a + n], r) for a, n, r in zip(starts, sizes, refs)]
                gen_of[refs[0]] = (idx, chunk, replica, pieces)
            if todo:
                self._grow()
            if self._started_at:
                self._drop_late_starts()
            if (gen_of or down) and time.monotonic() - self._last_restart_check > WATCH_S:
                down = self._check_restarts(gen_of, moved, todo, free, bar, desc)
            waiting = list(gen_of) + list(grading) + list(self._starting) + list(moved)
            if not waiting:  # chunks queued, and every free slot's replica was restarting when last looked at
                time.sleep(min(1.0, WATCH_S))
                down = self._check_restarts(gen_of, moved, todo, free, bar, desc)
                self._check_placed(bar, down)  # (a lost node with no room: bounded here too)
                continue
            ready, _ = ray.wait(waiting, num_returns=1, timeout=WATCH_S)
            if not ready:
                self._check_placed(bar, down)
                continue
            ref = ready[0]
            if ref in moved:  # (cancelled, or run anyway: its chunk is another call's now)
                replica = moved.pop(ref)
                if replica in self.samplers:
                    free.append(replica)
            elif ref in self._starting:
                self._started(ref, free)
            elif ref in gen_of:
                # A call's rows are graded in pieces of a few problems on several verifier actors: one actor per
                # call graded an APPS call of 2,048 samples (~0.35 s each) for 12 minutes while GPUs and the
                # other actors idled
                idx, chunk, replica, pieces = gen_of.pop(ref)
                free.append(replica)
                down.discard(_id(replica))  # it answered: it is up again
                attempt[idx] = token = object()
                parts[idx] = [None] * len(pieces)
                for k, g in enumerate(self.verifiers.submit_many(pieces)):
                    grading[g] = (idx, chunk, k, token)
            else:
                idx, chunk, k, token = grading.pop(ref)
                if attempt.get(idx) is not token:  # a piece of a call whose chunk went back to the queue
                    continue
                try:
                    rows = ray.get(ref)
                except ray.exceptions.ActorUnavailableError:
                    # The replica's node went away mid-call: Ray fails the call as "may or may not have run"
                    # rather than retry it. The chunk goes back to the queue (its seeds give the same samples), to
                    # whichever replica is free next, this one once Ray has restarted it (_check_placed bounds the
                    # wait for a node, _check_restarts its start); a chunk lost this often is a failure.
                    unavailable[idx] = unavailable.get(idx, 0) + 1
                    if unavailable[idx] > self.sampling.max_restarts + 1:
                        bar.close()
                        raise RunError(f"{desc}: chunk {idx} failed: its sampler replica was unavailable "
                                       f"{unavailable[idx]} times") from None
                    for rows in filter(None, parts.pop(idx)):  # (pieces counted already are counted again)
                        bar.update(-len(rows))
                        passed -= sum(r["reward"] for r in rows)
                        tokens -= sum(r["completion_tokens"] for r in rows)
                    for g in [g for g, (i, *_, tok) in grading.items() if i == idx and tok is token]:
                        del grading[g]  # this attempt's other pieces: not graded for nothing, not waited for
                        try:
                            ray.cancel(g)
                        except Exception:  # (already finished or failed)
                            pass
                    del attempt[idx]
                    todo.append((idx, chunk))
                    continue
                except ray.exceptions.RayActorError as e:  # the actor died more often than it may restart
                    bar.close()
                    raise RunError(f"{desc}: chunk {idx} failed after the allowed actor restarts "
                                   f"(sampling.max_restarts): {_cause(e)}") from None
                except ray.exceptions.RayTaskError as e:  # the call's own error: a retry would fail alike
                    bar.close()
                    raise RunError(f"{desc}: chunk {idx} failed: {_cause(e)}") from None
                passed += sum(r["reward"] for r in rows)
                tokens += sum(r["completion_tokens"] for r in rows)
                bar.update(len(rows))
                bar.set_postfix(accept=f"{passed / max(1, bar.n):.3f}",
                                tok_s=f"{tokens / max(1e-9, bar.format_dict['elapsed']):.0f}")
                parts[idx][k] = rows
                try:
                    if on_piece is not None:
                        on_piece(idx, rows)
                except BaseException:
                    bar.close()
                    raise
                if any(p is None for p in parts[idx]):
                    continue
                rows = [r for p in parts.pop(idx) for r in p]
                del attempt[idx]
                try:
                    on_chunk(idx, rows)
                except BaseException:
                    bar.close()  # the caller's one-line error (e.g. a broken verifier) gets a line of its own
                    raise
        bar.close()

    def _check_placed(self, bar, down: set) -> None:
        """A replica whose node was lost restarts once its placement group has a node again; on a cluster with
        no room for it (no replacement node, the autoscaler at its maximum) it would wait forever. Its calls go to
        the live replicas (_check_restarts); with none live (`down`: the ids of those restarting), past
        sampling.placement_timeout_s without a place the E-step stops in one line (finished shards are kept)."""
        from ray.util import placement_group_table

        now, waiting = time.monotonic(), []
        if now - self._last_check > 2 * WATCH_S:  # work flowed since the last look: what it saw is stale
            self._unplaced_since.clear()
        self._last_check = now
        for group in [self.group, *self.extra_groups]:
            try:
                state = placement_group_table(group).get("state")
            except Exception:  # (the GCS unreachable for a moment: the next wait looks again)
                continue
            if state in ("CREATED", "REMOVED", None):
                self._unplaced_since.pop(group.id, None)
                continue
            since = self._unplaced_since.setdefault(group.id, now)
            waiting.append(now - since)
        live = any(_id(r) not in down for r in self.samplers)
        if waiting and max(waiting) > self.sampling.placement_timeout_s and not live:
            bar.close()
            raise RunError(f"E-step: {len(waiting)} placement group(s) of sampler replicas lost a node and found "
                           f"no room to restart for {max(waiting):.0f} s (sampling.placement_timeout_s "
                           f"{self.sampling.placement_timeout_s:g}); add nodes (or let the autoscaler), then resume: "
                           "finished shards are kept")

    def _check_restarts(self, gen_of: dict, moved: dict, todo: list, free: list, bar, desc: str) -> set:
        """Replicas Ray restarts mid-E-step (an engine died, a node was lost) run their start again, minutes on GPUs
        (a new node, a weight read). While a replica restarts, its queued calls are cancelled and go back to the
        queue for the live replicas (their seeds give the same samples; `moved` keeps each such call until it
        resolves, its slot then free again): the E-step does not wait on one replica. The restart is bounded by
        sampling.start_timeout_s as the first start is (vLLM's own waits, NCCL set-up or a weight read, have no
        limit), counted only while every placement group is placed (_check_placed bounds the wait for a node): past
        it, a replica with live peers is dropped and the E-step goes on without it; with none, it stops in one line.
        Returns the ids of the replicas restarting now."""
        from ray.util import placement_group_table

        now = self._last_restart_check = time.monotonic()
        try:
            placed = all(placement_group_table(g).get("state") == "CREATED" for g in [self.group, *self.extra_groups])
        except Exception:
            placed = False
        down = {_id(r) for r in self.samplers if _actor_state(_id(r)) == "RESTARTING"}
        for aid in list(self._restarting_since):
            if aid not in down or not placed:
                self._restarting_since.pop(aid)
        if not any(_id(r) not in down for r in self.samplers):  # no live replica to move calls to: the E-step waits
            for aid in down if placed else ():
                if now - self._restarting_since.setdefault(aid, now) > self.sampling.start_timeout_s:
                    bar.close()
                    raise RunError(f"{desc}: a sampler replica Ray restarted has not started again within "
                                   f"sampling.start_timeout_s ({self.sampling.start_timeout_s:g} s; its engine's "
                                   "start hangs); finished shards are kept: resume once the cause is fixed")
            return down
        for ref, (idx, chunk, replica, _) in list(gen_of.items()):
            if _id(replica) in down:
                del gen_of[ref]
                ray.cancel(ref)  # (a cancelled call is not retried on the restarted replica)
                moved[ref] = replica
                todo.insert(0, (idx, chunk))
        for replica in [r for r in self.samplers if _id(r) in down]:
            if placed and now - self._restarting_since.setdefault(_id(replica), now) > self.sampling.start_timeout_s:
                ray.kill(replica)  # its bundle stays with the pool's placement group, unused until close()
                self._add_failed = True  # (no other replica is added in its place: it would likely hang alike)
                self.samplers.remove(replica)
                free[:] = [r for r in free if r is not replica]
                self._restarting_since.pop(_id(replica))
                down.discard(_id(replica))
                tqdm.write(f"[restem] {desc}: a sampler replica Ray restarted has not started again within "
                           f"sampling.start_timeout_s ({self.sampling.start_timeout_s:g} s) and was dropped; the "
                           f"E-step goes on with {len(self.samplers)} replica(s)")
        return down

    def close(self) -> None:
        # Engines first, then the actors: ray.kill ends a replica's process at once, but its engine's GPU workers
        # (a tensor-parallel engine's are the replica's grandchildren) exit later, and the next phase, the M-step
        # or the next policy's engines, could start on GPUs that still hold this one's weights and KV cache.
        # (A replica still starting is only killed: asking it to close would wait for its engine to load.)
        closing = [a.close.options(concurrency_group=CONTROL).remote() for a in self.samplers]
        if closing:
            ray.wait(closing, num_returns=len(closing), timeout=30)  # a dead or stuck replica is killed anyway
        # (ray.kill returns at once, and the GCS marks an actor dead when the kill is asked, not once its process and
        # GPU memory are gone: the M-step's workers wait for their GPU's memory themselves, training.M_STEP_FREE_GPU)
        for a in [*self.samplers, *self._starting.values()]:
            ray.kill(a)
        self.samplers, self._starting, self._started_at = [], {}, {}
        if self.verifiers is not None:
            self.verifiers.close()
        placing = [self._placing[0]] if self._placing is not None else []
        for g in ([self.group] if self.group is not None else []) + self.extra_groups + placing:
            remove_placement_group(g)  # the accelerators are free for the M-step
        self.group, self.extra_groups, self._placing = None, [], None


def reserve(group, timeout_s: float, what: str, key: str, quiet_s: float = 10.0) -> None:
    """Wait for a placement group's bundles, saying what it waits for once `quiet_s` have passed (an autoscaler
    starting GPU nodes takes minutes); after `timeout_s` the group is removed and the phase fails (`key` names the
    setting that bounds the wait)."""
    try:
        try:
            ray.get(group.ready(), timeout=min(quiet_s, timeout_s))
        except ray.exceptions.GetTimeoutError:
            if timeout_s <= quiet_s:
                raise
            print(f"[restem] waiting up to {timeout_s:g} s ({key}) for room for {what}", flush=True)
            ray.get(group.ready(), timeout=timeout_s - quiet_s)
    except BaseException as e:  # (a Ctrl-C in the wait too: the reservation would hold its nodes' resources)
        remove_placement_group(group)
        if isinstance(e, ray.exceptions.GetTimeoutError):
            raise RunError(f"no room for {what} after {timeout_s:g} s ({key})") from None
        raise


def _actor_state(actor_id: str) -> str | None:
    """An actor's state from the GCS (ALIVE, RESTARTING, ...); None when it cannot be read."""
    try:
        from ray._private.state import actors

        return actors(actor_id=actor_id).get("State")
    except Exception:  # (the GCS unreachable for a moment: the next look asks again)
        return None


def _id(replica) -> str:
    return replica._actor_id.hex()


def _cause(err: Exception) -> str:
    """Last line of a Ray error: the underlying exception, without the remote traceback."""
    return str(err).strip().splitlines()[-1][:300]
