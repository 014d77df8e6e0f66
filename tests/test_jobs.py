"""jobs/submit.py's errors. A job submitted through it to a real `ray start --head` cluster, its logs streamed and
its status returned, is the retry in test_resume.py's killed-head test."""
import subprocess
import sys
from pathlib import Path


def test_submitter_reports_an_unreachable_cluster_in_one_line():
    r = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "jobs" / "submit.py"), "--address",
                        "http://127.0.0.1:9", "--", "restem-ray", "demo"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "cannot reach the Ray dashboard" in r.stderr and "Traceback" not in r.stderr


def test_the_runtime_env_gets_settings_but_no_secrets_or_local_folders(tmp_path, monkeypatch):
    """HF_TOKEN would be shown by the dashboard and the Jobs API; a laptop's HF_HOME is no folder of the cluster."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "jobs"))
    try:
        import submit
    finally:
        sys.path.pop(0)
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


def test_a_bad_runtime_env_file_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("RESTEM_LOG_EVERY", "5")  # forwarded: env_vars is merged
    submit_py = str(Path(__file__).parents[1] / "jobs" / "submit.py")
    for content, needle in ((b"env_vars: [1, 2]\n", "env_vars must be a mapping of NAME: value"),
                            (b"env_vars: oops\n", "env_vars must be a mapping of NAME: value"),
                            (b"env_vars: {A: '\xff'}\n", "not UTF-8 text")):
        (tmp_path / "env.yaml").write_bytes(content)
        r = subprocess.run([sys.executable, submit_py, "--address", "http://127.0.0.1:9", "--runtime-env",
                            str(tmp_path / "env.yaml"), "--", "restem-ray", "demo"], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
