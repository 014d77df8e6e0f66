"""jobs/submit.py's errors. A job submitted through it to a real `ray start --head` cluster, its logs streamed and
its status returned, is the retry in test_resume.py's killed-head test."""
import subprocess
import sys
from pathlib import Path

import pytest


def test_submitter_reports_an_unreachable_cluster_in_one_line():
    r = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "jobs" / "submit.py"), "--address",
                        "http://127.0.0.1:9", "--", "restem-ray", "demo"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "cannot reach the Ray dashboard" in r.stderr and "Traceback" not in r.stderr


def _submit_module():
    sys.path.insert(0, str(Path(__file__).parents[1] / "jobs"))
    try:
        import submit
    finally:
        sys.path.pop(0)
    return submit


def test_the_runtime_env_gets_settings_but_no_secrets_or_local_folders(tmp_path, monkeypatch):
    """HF_TOKEN would be shown by the dashboard and the Jobs API; a laptop's HF_HOME is no folder of the cluster."""
    submit = _submit_module()
    import os

    for name in [k for k in os.environ if k.startswith(("HF_", "RESTEM_", "AWS_"))]:  # this shell's own
        monkeypatch.delenv(name)
    for name, value in {"HF_TOKEN": "hf_secret", "HF_HOME": "/Users/me/.cache/hf", "HF_HUB_OFFLINE": "1",
                        "RESTEM_LOG_EVERY": "5", "RESTEM_CACHE": "/Users/me/.cache/restem-ray",
                        "HF_ENDPOINT": "https://mirror.example", "RESTEM_S3_SECRET_KEY": "x", "HF_API_KEY": "y"}.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "env.yaml").write_text("env_vars: {HF_HUB_OFFLINE: '0'}\n")
    env = submit.load_runtime_env(str(tmp_path / "env.yaml"))["env_vars"]
    assert {k: env[k] for k in env if k.startswith(("HF_", "RESTEM_", "AWS_"))} == {
        "HF_HUB_OFFLINE": "0", "RESTEM_LOG_EVERY": "5", "HF_ENDPOINT": "https://mirror.example"}


def test_no_machine_local_folder_or_test_hook_reaches_the_job(monkeypatch):
    """Folders of this machine (whatever their name: every *_CACHE, *_DIR, *_PATH, *_HOME) and the test hooks that
    restem_ray/faults.py reads (a trace file, a crash point, a held start) stay here."""
    import os
    import re

    submit = _submit_module()
    for name in [k for k in os.environ if k.startswith(("HF_", "RESTEM_"))]:
        monkeypatch.delenv(name)
    faults = (Path(__file__).parents[1] / "restem_ray" / "faults.py").read_text()
    hooks = set(re.findall(r"environ\.get\(\"(RESTEM_\w+)\"", faults))
    assert hooks == {"RESTEM_CRASH_AT", "RESTEM_TRACE", "RESTEM_HOLD_START"}, hooks
    local = {"RESTEM_MODEL_CACHE": "/tmp/restem-models", "HF_MODULES_CACHE": "/Users/me/.cache/hf/modules",
             "RESTEM_RUN_CACHE": "/Users/me/runs", "HF_HUB_CACHE": "/Users/me/hub", "RESTEM_SOME_DIR": "/x",
             "HF_STORED_TOKENS_PATH": "/Users/me/tokens", "HF_HOME": "/Users/me/.cache/hf"}
    for name, value in {**local, **{h: "/tmp/hook" for h in hooks}, "RESTEM_LOG_EVERY": "5"}.items():
        monkeypatch.setenv(name, value)
    assert submit.load_runtime_env(None)["env_vars"] == {"RESTEM_LOG_EVERY": "5"}


class _FakeJobs:
    """A JobSubmissionClient that reports the given statuses in turn and records stop_job."""

    def __init__(self, statuses):
        self.statuses, self.stopped = list(statuses), []

    def __call__(self, address):
        return self

    def submit_job(self, **kw):
        return "raysubmit_1"

    async def tail_job_logs(self, job_id):
        yield "a log line\n"

    def get_job_status(self, job_id):
        return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]

    def get_job_info(self, job_id):
        class Info:
            message = ""
        return Info()

    def stop_job(self, job_id):
        self.stopped.append(job_id)
        return True


def test_ctrl_c_while_waiting_for_the_final_status_stops_the_job(monkeypatch, capsys):
    """The logs can end before the job's status is final: a Ctrl-C in that wait stops the job as one during the
    logs does (exit 130), and without one the job's outcome is the exit status."""
    import ray.job_submission as js

    submit = _submit_module()
    argv = ["--address", "http://127.0.0.1:8265", "--", "restem-ray", "demo"]
    fake = _FakeJobs([js.JobStatus.RUNNING])
    monkeypatch.setattr(js, "JobSubmissionClient", fake)

    def interrupted(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(submit.time, "sleep", interrupted)
    try:
        code = submit.main(argv)
    except KeyboardInterrupt:  # (uncaught, it would also end this pytest session)
        pytest.fail("Ctrl-C while waiting for the status left the job running (traceback, no stop_job)")
    assert code == 130 and fake.stopped == ["raysubmit_1"]
    assert "stopped job raysubmit_1" in capsys.readouterr().err
    fake = _FakeJobs([js.JobStatus.RUNNING, js.JobStatus.RUNNING, js.JobStatus.SUCCEEDED])
    monkeypatch.setattr(js, "JobSubmissionClient", fake)
    monkeypatch.setattr(submit.time, "sleep", lambda s: None)
    assert submit.main(argv) == 0 and fake.stopped == []


def test_a_bad_runtime_env_file_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("RESTEM_LOG_EVERY", "5")  # forwarded: env_vars is merged
    submit_py = str(Path(__file__).parents[1] / "jobs" / "submit.py")
    for content, needle in ((b"env_vars: [1, 2]\n", "env_vars must be a mapping of NAME: value"),
                            (b"env_vars: oops\n", "env_vars must be a mapping of NAME: value"),
                            (b"env_vars: {A: '\xff'}\n", "not UTF-8 text"),
                            # Ray's RuntimeEnv takes strings only: a number is a one-line error naming the key
                            (b"env_vars: {OMP_NUM_THREADS: 4}\n",
                             'env_vars.OMP_NUM_THREADS must be a string, not int 4 (quote it: OMP_NUM_THREADS: "4")'),
                            (b"env_vars: {A: true}\n", "env_vars.A must be a string, not bool True"),
                            (b"env_vars: {A: }\n", "env_vars.A must be a string, not NoneType None"),
                            (b"env_vars: {1: x}\n", "env_vars name 1 must be a string")):
        (tmp_path / "env.yaml").write_bytes(content)
        r = subprocess.run([sys.executable, submit_py, "--address", "http://127.0.0.1:9", "--runtime-env",
                            str(tmp_path / "env.yaml"), "--", "restem-ray", "demo"], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
