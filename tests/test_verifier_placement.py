"""Where code verifiers run (issue: a cluster whose head or GPU pods cannot run bubblewrap): they ask for the
`sandbox` resource the sandbox-capable nodes advertise, and the sandbox pre-check runs in such an actor, not in
the driver. Real Ray, real bubblewrap."""
import os
import time

import pytest
import ray

from restem_ray.config import RestemConfig, VerificationConfig
from restem_ray.errors import UserError
from restem_ray.resources import check_cluster, check_verifier_on_cluster, sandbox_resources


def test_code_verifiers_ask_for_the_sandbox_resource_only_where_a_cluster_advertises_it():
    assert sandbox_resources(None, code=True, cluster={"CPU": 8, "sandbox": 1000}) == {"sandbox": 1.0}
    assert sandbox_resources(None, code=True, cluster={"CPU": 8}) == {}        # a local Ray: placed as before
    assert sandbox_resources(None, code=False, cluster={"CPU": 8, "sandbox": 1000}) == {}  # math: anywhere
    assert sandbox_resources({}, code=True, cluster={"sandbox": 1000}) == {}   # explicitly off
    assert sandbox_resources({"verifier_pool": 1}, code=False, cluster={}) == {"verifier_pool": 1}


def test_the_fit_check_counts_only_sandbox_nodes_for_code_verifiers():
    """8 code verifiers of 0.25 CPU: a big GPU node without `sandbox` does not count; the 1-CPU sandbox node holds 4."""
    tree = {"task": {"kind": "code", "train_file": "t", "valid_file": "v"}, "model": {"base": "m"},
            "verification": {"num_workers": 8}}
    cfg = RestemConfig.model_validate(tree)
    nodes = [{"CPU": 64, "GPU": 8}, {"CPU": 1, "sandbox": 1000}]
    with pytest.raises(UserError, match=r"8 verifier\(s\) need CPU 0.25, sandbox 1 each; it holds 4"):
        check_cluster(cfg, nodes)
    check_cluster(cfg, [{"CPU": 64, "GPU": 8}, {"CPU": 2, "sandbox": 1000}])
    math = RestemConfig.model_validate({**tree, "task": {**tree["task"], "kind": "math"}})
    check_cluster(math, nodes)  # math verifiers go anywhere


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=4, resources={"sandbox": 2}, include_dashboard=False)
    yield
    ray.shutdown()


def test_code_verifiers_take_the_sandbox_resource_and_the_precheck_runs_in_one(cluster):
    from restem_ray.pool import VerifierPool

    where = check_verifier_on_cluster("code", VerificationConfig())
    assert where["pid"] != os.getpid() and where["node"] == ray.get_runtime_context().get_node_id()
    pool = VerifierPool("code", VerificationConfig(num_workers=2, max_workers=3))
    try:
        assert pool.resources == {"sandbox": 1.0}
        pool.ready()
        assert ray.available_resources().get("sandbox", 0) == 0   # both took theirs
        assert not pool.grow()                                    # CPUs are free, `sandbox` is not
        graded = pool.grade_all({"p": {"id": "p", "prompt": "def f(x):\n", "test": "def check(f):\n    assert f(2) == 4\n",
                                       "entry_point": "f"}},
                                [{"id": "p", "completion": "    return x * 2\n"}, {"id": "p", "completion": "    return x\n"}])
        assert [g["verdict"] for g in graded] == ["passed", "wrong_answer"]
    finally:
        pool.close()
    math = VerifierPool("math", VerificationConfig(num_workers=1))
    assert math.resources == {}
    math.close()


def test_grading_goes_to_the_verifier_with_the_fewest_unfinished_calls(cluster):
    """A chunk whose program runs for seconds holds its actor: the next chunks go to the other one instead of
    queueing behind it in turn, and grade_all keeps at most two chunks per actor in flight."""
    from restem_ray.pool import VerifierPool

    problem = {"id": "p", "prompt": "def f(x):\n", "test": "def check(f):\n    assert f(2) == 4\n",
               "entry_point": "f"}
    pool = VerifierPool("code", VerificationConfig(num_workers=2))
    try:
        pool.ready()
        slow = pool.submit([problem], [{"id": "p", "completion": "    import time\n    time.sleep(4)\n    return x * 2\n"}])
        for _ in range(3):  # each graded as it comes, as the E-step's chunks arrive from the replicas
            fast = pool.submit([problem], [{"id": "p", "completion": "    return x * 2\n"}])
            assert ray.get(fast)[0]["verdict"] == "passed"
        assert [r.hex() for r in pool._inflight[0]] == [slow.hex()]  # none in turn behind the slow one
        assert not ray.wait([slow], timeout=0)[0]  # (still running: the fast ones did not wait for it)
        assert ray.get(slow)[0]["verdict"] == "passed"
        rows = [{"id": "p", "completion": f"    return x * {k}\n"} for k in range(10)]
        graded = pool.grade_all({"p": problem}, rows, chunk_size=1)
        assert [g["verdict"] == "passed" for g in graded] == [k == 2 for k in range(10)]  # in input order
    finally:
        pool.close()


def test_a_verifier_that_dies_past_its_restarts_stops_grading_in_one_line(cluster):
    """`restem-ray verify` grades through grade_all: a verifier killed for good mid-chunk (an OOM kill past
    max_restarts) is a RunError naming the chunk, not a RayActorError traceback."""
    import threading

    from restem_ray.errors import RunError
    from restem_ray.pool import VerifierPool

    problem = {"id": "p", "prompt": "def f(x):\n", "test": "def check(f):\n    assert f(2) == 4\n",
               "entry_point": "f"}
    pool = VerifierPool("code", VerificationConfig(num_workers=1), max_restarts=0)
    try:
        pool.ready()
        threading.Timer(2.0, lambda: ray.kill(pool.actors[0], no_restart=True)).start()
        with pytest.raises(RunError, match=r"^verify: chunk 0 failed after the allowed verifier restarts: "):
            pool.grade_all({"p": problem}, [{"id": "p", "completion": "    import time\n    time.sleep(8)\n"
                                                                     "    return x * 2\n"}], desc="verify")
    finally:
        pool.close()


def test_a_sandbox_that_cannot_start_on_the_verifier_node_is_one_line(cluster):
    with pytest.raises(UserError) as e:
        check_verifier_on_cluster("code", VerificationConfig(sandbox_python="/nonexistent/python3"))
    msg = str(e.value)
    assert msg.startswith("verification.verifier: code: the sandbox cannot start on a verifier node: ") and "\n" not in msg
    assert "/nonexistent/python3" in msg, msg


def test_an_elastic_pool_never_waits_on_a_bundle_no_single_node_holds(cluster, monkeypatch):
    """Free resources summed over nodes can hold a replica's bundle that no node holds (two nodes with 2 of a
    bundle's 3 each). Growing the pool used to wait 10 s on that placement group every 2 s, while no chunk was
    dispatched or graded; now it asks once, checks without waiting, and gives up after 10 s."""
    import time

    from restem_ray.config import SamplingConfig
    from restem_ray.pool import EStepPool

    class NoVerifiers:
        def grow(self):
            pass

    started = []
    pool = object.__new__(EStepPool)  # the growing part alone: no vLLM replicas
    pool.sampling = SamplingConfig(num_replicas=1, max_replicas=2, cpus_per_replica=1)
    pool.samplers, pool._starting, pool.extra_groups, pool._add_failed = ["replica 0"], {}, [], False
    pool.group, pool._placing, pool._last_grow, pool.verifiers = None, None, 0.0, NoVerifiers()
    pool._start_replica = started.append
    pool._grow_args = (None, {"CPU": 1, "sandbox": 3}, {}, {}, 0, 0)
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 4, "sandbox": 4})  # 2 + 2 on two nodes
    t = time.monotonic()
    for _ in range(3):
        pool._grow()
    assert time.monotonic() - t < 2 and pool._placing is not None and not started
    group, ref, since = pool._placing
    pool._placing = (group, ref, since - 11)  # 10 s later: given up, the group removed
    pool._grow()
    assert pool._placing is None and ray.util.placement_group_table(group)["state"] == "REMOVED"
    pool._grow_args = (None, {"CPU": 1, "sandbox": 1}, {}, {}, 0, 0)  # a bundle that fits
    pool._last_grow = 0.0
    pool._grow()
    deadline = time.monotonic() + 30
    while not started and time.monotonic() < deadline:
        pool._grow()
        time.sleep(0.1)
    assert len(started) == 1 and pool._placing is None  # placed: the replica starts on that group
    ray.util.remove_placement_group(started[0])


def test_closing_the_pool_shuts_each_engine_down_before_ending_its_replica(cluster):
    """ray.kill ends a replica's process at once, but the GPU workers of its engine exit later: the next phase
    could start on GPUs still holding the engine. Each replica's engine is shut down first (Sampler.close), also
    while its calls are still running (an error or Ctrl-C mid-E-step): they hold every thread of the replica's
    default group, and a `close` queued behind them would reach none of the engines before the pool kills them."""
    import threading

    from restem_ray.pool import CONTROL, EStepPool

    @ray.remote
    class Log:
        def __init__(self):
            self.lines = []

        def add(self, line):
            self.lines.append(line)

        def get(self):
            return self.lines

    @ray.remote(concurrency_groups={CONTROL: 1})  # as EStepPool makes its replicas
    class Replica:
        def __init__(self, log, name):
            self.log, self.name = log, name
            self.shut_down = threading.Event()

        def generate(self):  # a call in flight until the engine is shut down under it
            ray.get(self.log.add.remote(f"{self.name} call"))
            return self.shut_down.wait(120)

        def close(self):
            ray.get(self.log.add.remote(f"{self.name} engine shut down"))
            self.shut_down.set()

    class NoVerifiers:
        def close(self):
            pass

    log = Log.remote()
    pool = object.__new__(EStepPool)
    pool.samplers = [Replica.options(max_concurrency=2).remote(log, f"r{i}") for i in range(2)]
    pool._starting, pool.extra_groups, pool.group, pool._placing = {}, [], None, None
    pool.verifiers = NoVerifiers()
    replicas = list(pool.samplers)
    calls = [r.generate.remote() for r in replicas for _ in range(2)]  # both threads of each default group
    deadline = time.monotonic() + 60
    while len(ray.get(log.get.remote())) < len(calls):
        assert time.monotonic() < deadline, ray.get(log.get.remote())
        time.sleep(0.1)
    pool.close()
    assert sorted(ray.get(log.get.remote())) == ["r0 call"] * 2 + ["r0 engine shut down"] + ["r1 call"] * 2 + [
        "r1 engine shut down"]
    for r in replicas:  # and then ended
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(r.close.remote(), timeout=30)


def test_a_run_directory_every_node_sees_passes_and_one_some_do_not_is_one_line(cluster, tmp_path):
    """A local --out on a cluster: each other node reads a marker written here (a one-node Ray has none to ask;
    the two-node runs of test_resume.py and test_multinode.py pass it on a shared folder). The refusal names
    how many nodes do not see it."""
    from restem_ray.resources import _holds, check_run_dir_on_every_node, run_dir_not_shared

    check_run_dir_on_every_node(tmp_path / "new" / "run")  # one node: nothing to ask, nothing written
    assert not list(tmp_path.iterdir())
    (tmp_path / "m").write_text("abc")
    assert _holds(str(tmp_path / "m"), "abc") and not _holds(str(tmp_path / "m"), "abd")
    assert not _holds(str(tmp_path / "absent"), "abc")
    assert run_dir_not_shared("/local/run", ["10.0.0.7"], 3) == (
        "--out /local/run: 1 of the cluster's 3 nodes do not see it (e.g. 10.0.0.7); the training workers and "
        "sampler replicas read each iteration's data and checkpoints from it: give --out a folder every node "
        "mounts (e.g. /shared/runs/NAME) or an object-store URI")


def test_a_phase_waits_for_room_saying_so_and_gives_up_in_one_line(cluster, capsys):
    """An autoscaling cluster adds nodes minutes after a phase asks: the wait is said once, a group that gets
    its room (here: when another group frees the CPUs) goes on, and one that never does is removed and the run
    stops in one line naming the setting that bounds the wait."""
    import threading

    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    from restem_ray.errors import RunError
    from restem_ray.pool import reserve

    holder = placement_group([{"CPU": 4}])
    ray.get(holder.ready(), timeout=30)
    group = placement_group([{"CPU": 2}])
    threading.Timer(1.5, remove_placement_group, args=(holder,)).start()  # the "new node"
    reserve(group, 30.0, "2 things", "sampling.placement_timeout_s", quiet_s=0.5)
    assert "[restem] waiting up to 30 s (sampling.placement_timeout_s) for room for 2 things" in capsys.readouterr().out
    late = placement_group([{"CPU": 4}])  # the CPUs that remain: 2 of 4
    with pytest.raises(RunError, match=r"^no room for 4 things after 1.5 s \(sampling.placement_timeout_s\)$"):
        reserve(late, 1.5, "4 things", "sampling.placement_timeout_s", quiet_s=0.5)
    assert placement_group_table(late)["state"] == "REMOVED"
    remove_placement_group(group)


def test_a_flash_attention_kernel_whose_package_the_m_step_nodes_lack_is_refused_at_start(cluster, monkeypatch, capsys):
    """training.attn_implementation: flash_attention_2 on an image built without flash-attn failed in every rank at
    the first M-step's model load, after the baseline evaluation and a whole E-step. Now the start looks for the
    package on every node that can host a training worker (here: this cluster's one node), in a worker process."""
    from restem_ray import resources
    from restem_ray.resources import check_attention_on_cluster

    tree = {"task": {"train_file": "t", "valid_file": "v"}, "model": {"base": "m"}}

    def cfg(**training):
        return RestemConfig.model_validate({**tree, "training": training,
                                            "sampling": {"use_gpu": training.get("use_gpu", False)}})
    # (names no node holds, on any machine the suite runs on: the package and its fallback)
    monkeypatch.setitem(resources.ATTENTION_PACKAGES, "flash_attention_2", ("restem_no_such_package", "restem_nor_this"))
    with pytest.raises(UserError, match=r"^training.attn_implementation: flash_attention_2 needs the "
                                        r"restem_no_such_package package, which 1 of 1 node\(s\) that can host a "
                                        r"training worker lack \(127.0.0.1\): build the GPU image with FLASH_ATTN_WHEELS"):
        check_attention_on_cluster(cfg(attn_implementation="flash_attention_2"))
    check_attention_on_cluster(cfg(attn_implementation="sdpa"))  # nothing to look for
    monkeypatch.setitem(resources.ATTENTION_PACKAGES, "flash_attention_2", ("restem_no_such_package", "pyarrow"))
    check_attention_on_cluster(cfg(attn_implementation="flash_attention_2"))
    # workers pinned to nodes of a custom resource, none of them up yet (an autoscaling group): nothing to look at
    check_attention_on_cluster(cfg(attn_implementation="flash_attention_2", resources_per_worker={"trainer": 1}))
    assert "no node that can host a training worker is up yet to look for restem_no_such_package on" in \
        capsys.readouterr().out

