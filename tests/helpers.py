"""Helpers shared by the slow end-to-end tests."""
import os
import signal
import subprocess
import sys

# A small `demo --quick` (64 train problems x 8 samples, 16 problems per eval split): the reference that
# the resume and multi-node tests compare against, row for row.
# greedy pass@1 only and 2 epochs: the runs built on SMALL check phases, resumption and pass@1, not the
# demo's pass@4/maj@4 or its gain (the resume test's M-step checkpoints every 2 steps: half the steps, half the saves).
# A local Ray of 2 logical CPUs holds the E-step (a replica of 1 CPU, 2 verifiers of 0.25) or the M-step (2
# workers of 1 CPU), never both: every SMALL run on a local Ray also proves the phases hand the CPUs over
# (test_run_lifecycle). Runs on `ray start` clusters ignore it.
# Their local Ray starts without its dashboard (ray.include_dashboard): its processes cost ~3 s of CPU a start, and
# the quick demo's and GSM8K's tests run with it, the default.
SMALL = ["--quick", "--set", "task.max_train_problems=64", "--set", "task.max_eval_problems=16",
         "--set", "evaluation.k=0", "--set", "training.epochs=2", "--set", "ray.num_cpus=2",
         "--set", "ray.include_dashboard=false"]


# Private network and PID namespaces for the tests' `ray start` clusters: their fixed ports and head addresses
# cannot meet another cluster on the machine, and their `ray stop --force` (which ends every Ray process it can
# see) cannot end another test worker's Ray, or a Ray of the machine's user. Whatever a script leaves running
# ends with it (its bash is the namespace's init, killed with `unshare` on a test's timeout).
NETNS = (["unshare"] if os.geteuid() == 0 else ["unshare", "--user", "--map-root-user"]) + [
    "--net", "--pid", "--fork", "--mount-proc", "--kill-child"]

def demo(out, *extra, crash_at=None, timeout=900):
    """Run `restem-ray demo` with SMALL in its own session; returns (exit code, combined output)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RESTEM_CRASH_AT", None)
    if crash_at:
        env["RESTEM_CRASH_AT"] = crash_at
    p = subprocess.Popen([sys.executable, "-m", "restem_ray.cli", "demo", *SMALL, "--out", str(out), *extra],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                         start_new_session=True)
    try:
        log, _ = p.communicate(timeout=timeout)
    finally:
        try:  # Ray's agents outlive a SIGKILLed driver for a while; they are in its session
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return p.returncode, log


def rows(path):
    """A Parquet file's (or folder's) rows, in (id, sample_index) order."""
    import pyarrow.parquet as pq

    return sorted(pq.read_table(path).to_pylist(), key=lambda r: (r["id"], r["sample_index"]))


def assert_same_run(out, reference):
    """The run in `out` ended with the reference run's samples, training rows, scores and weights, exactly."""
    import json

    from safetensors.torch import load_file

    assert rows(out / "iter_001" / "samples") == rows(reference / "iter_001" / "samples")
    assert rows(out / "iter_001" / "train.parquet") == rows(reference / "iter_001" / "train.parquet")
    for t in ("iter_000", "iter_001"):
        assert json.loads((out / t / "eval.json").read_text()) == json.loads((reference / t / "eval.json").read_text())
    ours, theirs = (load_file(r / "iter_001" / "checkpoint" / "model.safetensors") for r in (out, reference))
    assert set(ours) == set(theirs) and all((ours[k] == theirs[k]).all() for k in theirs)


def tracebacks(log: str) -> list[str]:
    """The lines of a run's output that start a traceback."""
    return [line for line in log.splitlines() if "Traceback" in line]


def free_port() -> int:
    """A free loopback port: a fixed one (a torch.distributed rendezvous) collides with the other test worker's."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_own_code(folder, architectures: bool = True):
    """Make the HF folder of a Llama model (`folder`, changed in place) one that ships its own code, as models
    whose type transformers lacks do (InternLM2, MiniCPM, ...): model type 'restem_toy', config and model classes
    in the folder's own modules, named by config.json's auto_map. transformers knows no 'restem_toy', so the folder
    loads only by running that code. The classes compute what Llama's do: a run on it must equal one on `folder`."""
    import json
    from pathlib import Path

    folder = Path(folder)
    (folder / "configuration_toy.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass ToyConfig(LlamaConfig):\n    model_type = 'restem_toy'\n")
    (folder / "modeling_toy.py").write_text(  # (AutoModel too: vLLM serves such a model through it)
        "from transformers import LlamaForCausalLM, LlamaModel\n\nfrom .configuration_toy import ToyConfig\n\n\n"
        "class ToyModel(LlamaModel):\n    config_class = ToyConfig\n\n\n"
        "class ToyForCausalLM(LlamaForCausalLM):\n    config_class = ToyConfig\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="restem_toy", auto_map={
        "AutoConfig": "configuration_toy.ToyConfig", "AutoModel": "modeling_toy.ToyModel",
        "AutoModelForCausalLM": "modeling_toy.ToyForCausalLM"})
    if architectures:
        config["architectures"] = ["ToyForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder
