"""Metrics beyond metrics.jsonl: TensorBoard event files in RUN/tensorboard/ (tensorboardX, which Ray
already installs) and, when configured, an MLflow run and a Weights & Biases run.

Every numeric field of a committed phase line becomes a scalar `phase/field` (eval lines:
`eval/<split>/pass_at_1`) at step = iteration; the control arm's lines go under `control/`. The M-step's
live step lines become `improve_step/iter_NNN/<field>` (control: `control/improve_step/<field>`) at step =
the M-step's optimizer step: every M-step starts from the base model, so each has its own curve.
`metrics.jsonl` stays the source of truth; these are views of it for the usual dashboards.

RUN/tracking.json keeps the MLflow and W&B run ids, so a resumed run logs to the run it started, and, per
dashboard, the committed phases it took ("sent"). A phase one did not take (the driver killed between the commit
and the send, a server down at the time, a dashboard new to the run) is sent to it at the next commit or resume,
with its M-step's step lines when they never went to it live: every dashboard gets every committed phase at least
once (a kill between a send and its record sends it twice).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

from .environ import scoped_environ
from .errors import UserError, first_line, shown_uri
from .storage import STEP_PHASE, atomic_write_text, split_key

TRACKING_FILE = "tracking.json"
DASHBOARDS = ("tensorboard", "mlflow", "wandb")  # their names in tracking.json
MLFLOW_PAUSE_S = 600.0  # after a failed request, MLflow is not asked again for this long
PAUSED = f"not sent: a request failed within the last {MLFLOW_PAUSE_S / 60:.0f} minutes"  # (what a paused MLflow says)
MISSING = {"mlflow": "observability.mlflow_tracking_uri is set but mlflow is not installed (pip install "
                     "'restem-ray[dashboards]', or mlflow-skinny)",
           "wandb": "observability.wandb_project is set but wandb is not installed (pip install "
                    "'restem-ray[dashboards]', or wandb)"}


def check_sinks(o, keep_new_store: bool = False) -> None:
    """Before any work: each configured dashboard's package is importable (`o`: ObservabilityConfig).
    `keep_new_store`: a run's start, which logs to a local MLflow store its check made (`check` leaves none)."""
    import importlib

    for package, wanted in (("mlflow", o.mlflow_tracking_uri), ("wandb", o.wandb_project)):
        if wanted:
            try:
                importlib.import_module(package)
            except ImportError:
                raise UserError(MISSING[package]) from None
    if o.mlflow_tracking_uri:
        check_mlflow(o.mlflow_tracking_uri, o.mlflow_experiment, keep_new_store)
    if o.wandb_project:
        check_wandb(o.wandb_mode)


def check_wandb(mode: str | None) -> None:
    """An online W&B run needs credentials here (WANDB_API_KEY, `wandb login`'s .netrc entry, an identity token
    file): without them `wandb.init` failed after the run directory was written. Found as wandb.init finds them,
    without asking on the terminal and without a request; a wandb without this lookup is not checked."""
    try:
        from wandb.errors import AuthenticationError
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib.wbauth.authenticate import authenticate_session

        settings = wandb_setup.singleton().settings  # (read once per process: the environment is read first)
    except Exception:  # (another wandb version, whose internals differ: wandb.init says it later)
        return
    if (mode or os.environ.get("WANDB_MODE") or settings.mode) in ("offline", "dryrun", "disabled"):
        return
    host = os.environ.get("WANDB_BASE_URL") or settings.base_url
    try:
        found = authenticate_session(host=host, source="restem-ray", prompt=False, update_session=False)
    except AuthenticationError as e:
        raise UserError(f"observability.wandb_project: W&B credentials for {host}: {first_line(e)}") from None
    except Exception:  # (the lookup's own signature or behaviour changed in another version)
        return
    if found is None:
        raise UserError(f"observability.wandb_project: no W&B credentials for {host} here (set "
                        "WANDB_API_KEY or run `wandb login`; or observability.wandb_mode: offline, and `wandb sync` "
                        "later)")


def check_mlflow(uri: str, experiment: str, keep_new_store: bool = False) -> None:
    """One request to the tracking server before the run directory is written: a server down, a wrong URI or a
    store MLflow refuses (its file store, unless MLFLOW_ALLOW_FILE_STORE) fails `check` and `run` in one line,
    not the first phase's commit. Two retries, not MLflow's seven with back-off (minutes on a refused port)."""
    import mlflow

    # a file store that is not there yet is made by the request: `check` writes nothing, so it goes again (a run
    # keeps it: MLflow keeps the store it opened for the URI, and a store removed under it fails the run's start)
    local = uri.removeprefix("file://") if uri.startswith("file://") or ":" not in uri else None
    new_store = local if local and not os.path.exists(local) and not keep_new_store else None
    fail_fast = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES") or "2",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT") or "20"}
    try:
        with scoped_environ(fail_fast):
            mlflow.MlflowClient(uri).get_experiment_by_name(experiment)
    except Exception as e:
        raise UserError(f"observability.mlflow_tracking_uri: {shown_uri(uri)}: {first_line(e, uri)}") from None
    finally:
        if new_store:
            shutil.rmtree(new_store, ignore_errors=True)


def _head(iteration, phase: str, line: dict) -> str:
    prefix = "control/" if iteration == "control" else ""
    if phase == STEP_PHASE:
        return f"{prefix}{phase}" if iteration == "control" else f"{phase}/iter_{int(iteration):03d}"
    return f"{prefix}{phase}/{line['split']}" if phase == "eval" and "split" in line else f"{prefix}{phase}"


def scalars(iteration, phase: str, line: dict) -> dict[str, float]:
    head = _head(iteration, phase, line)
    skip = ("time", "iteration", "step", "total_steps") if phase == STEP_PHASE else ("time", "iteration")
    # one level of counts becomes one curve each: the E-step's {"verdicts": {"passed": n, "timeout": n}} ->
    # generate/verdicts/passed, generate/verdicts/timeout (verdict names carry ':', e.g. verifier_error:KeyError)
    flat = {}
    for k, v in line.items():
        if isinstance(v, dict):
            flat |= {f"{k}/{kind}": n for kind, n in v.items()}
        else:
            flat[k] = v
    # TensorBoard and MLflow accept neither '@' nor spaces (nor ':', MLflow) in names: pass@1 -> pass_at_1; MLflow
    # takes letters, digits, '_', '-', '.', '/' (an extra eval split named "gsm8k(hard)" lost a whole commit's)
    return {_metric_name(f"{head}/{k}"): float(v) for k, v in flat.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in skip}


class Refused(RuntimeError):
    """Some points a dashboard that is up will never take (a name or value it refuses): the others are taken, and
    sending them again would change nothing."""


def _refused_value(e: Exception) -> bool:
    """An MLflow error about a metric's name or value, from a server that is up (not a deleted run's, which MLflow
    reports with the same code)."""
    return getattr(e, "error_code", None) == "INVALID_PARAMETER_VALUE" and "lifecycle_stage" not in str(e)


def _metric_name(name: str) -> str:
    """A name both dashboards take: MLflow refuses other characters, and a path its normalisation would change
    ("eval/hard//pass_at_1" for a split named "hard/")."""
    name = re.sub(r"[^\w./-]", "_", name.replace("@", "_at_"))
    return "/".join(part for part in name.split("/") if part not in ("", ".", ".."))


def _read_tracking(path: Path) -> dict:
    """RUN/tracking.json, checked: one line naming it when damaged (not a traceback from deep in a dashboard)."""
    if not path.is_file():
        return {}
    problem = None
    try:
        ids = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        problem = "not valid JSON"
    else:
        if not isinstance(ids, dict) or not all(isinstance(v, dict) for v in ids.values()):
            problem = "not a map of dashboards to their records"
        elif any(not isinstance(v.get("sent", []), list) or not all(isinstance(k, str) and "/" in k for k in v.get("sent", []))
                 for v in ids.values()):
            problem = "a 'sent' list that is not a list of phase keys"
    if problem:
        raise UserError(f"{path}: {problem} (the dashboards' run ids and what they took; remove it to start new "
                        "dashboard runs that get every committed phase)")
    return ids


def step_key(iteration) -> str:
    """The key under which a dashboard's record says it has an M-step's step lines (beside the phase keys of the
    manifest: "1/improve" and "1/improve_step")."""
    return f"{iteration}/{STEP_PHASE}"


def _without_credentials(tree):
    """A config as the dashboards may show it: URIs without the keys pyarrow and MLflow accept in them."""
    if isinstance(tree, dict):
        return {k: _without_credentials(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_without_credentials(v) for v in tree]
    return shown_uri(tree) if isinstance(tree, str) and re.match(r"[A-Za-z][A-Za-z0-9+.-]*://\S*$", tree) else tree


def _tb_writer(logdir: str):
    """A TensorBoard writer to a new event file. tensorboardX names its files by the second and opens them with
    "wb": a second writer in the same second (the next commit's, a resumed driver's) would empty the first's file.
    (The suffix keeps them in the order written.)"""
    from tensorboardX import SummaryWriter

    return SummaryWriter(logdir=logdir, flush_secs=5, filename_suffix=f".{time.time_ns()}.{os.getpid()}")


class MetricsSink:
    """Receives each committed phase's metrics lines (`RunDir.complete`) and the M-step's live step lines
    (`RunDir.log_steps`)."""

    def __init__(self, run_root: Path, tensorboard: bool = True, mlflow_uri: str | None = None,
                 mlflow_experiment: str = "restem-ray", wandb_project: str | None = None,
                 wandb_entity: str | None = None, wandb_mode: str | None = None, config: dict | None = None,
                 committed=()):
        """`committed`: the phases the run directory has committed so far (manifest keys). A dashboard continued
        from a record of an earlier version, which kept no list of what it took, is taken to have them all."""
        run_root = Path(run_root)
        self._tb = self._mlflow = self._wandb = None
        self._mlflow_uri, self._mlflow_run = mlflow_uri, None
        self._mlflow_down_until = 0.0  # a server that failed a call is left alone a while (MLFLOW_PAUSE_S)
        ids_path = run_root / TRACKING_FILE
        ids = _read_tracking(ids_path)
        prior_sent = {name: ids.get(name, {}).get("sent") for name in DASHBOARDS}
        continued = {}  # dashboard -> whether it continues what an earlier invocation logged to
        if tensorboard:
            continued["tensorboard"] = any((run_root / "tensorboard").glob("events.out.tfevents.*"))
            # (the writer starts once the record is written: event files without a record read as an earlier version's)
            self._tb_dir, self._tb_lock = str(run_root / "tensorboard"), threading.Lock()
        if mlflow_uri:
            try:
                import mlflow
            except ImportError:
                raise UserError(MISSING["mlflow"]) from None
            prior = ids.get("mlflow") or {}
            # a server down mid-run: each call gives up in seconds, not after MLflow's default retries and
            # timeouts (minutes per call, on the driver's main thread); metrics.jsonl keeps every line anyway
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
            try:
                mlflow.set_tracking_uri(mlflow_uri)
                mlflow.set_experiment(mlflow_experiment)
                # a run id means nothing on another tracking server: continue only on the one that made it
                run = None
                # (nor in another experiment: MLflow refuses to continue a run outside the active one)
                if prior.get("run_id") and prior.get("tracking_uri") in (mlflow_uri, shown_uri(mlflow_uri)) \
                        and prior.get("experiment", mlflow_experiment) == mlflow_experiment:
                    try:
                        run = mlflow.start_run(run_id=prior["run_id"])
                    except mlflow.exceptions.MlflowException as e:  # deleted there, or its experiment renamed
                        # (MLflow 3.17 raises a deleted run, and one of an experiment renamed since, as INTERNAL_ERROR)
                        gone = e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE") \
                            or "deleted state" in str(e) or "experiment ID does not match" in str(e)
                        if not gone:
                            raise  # (a server down: not a reason to split the run's curves)
                        print(f"[restem] warning: MLflow run {prior['run_id']} cannot be continued "
                              f"({first_line(e, mlflow_uri, limit=160)}); the run logs to a new one", flush=True)
                elif prior.get("run_id"):
                    print(f"[restem] note: MLflow run {prior['run_id']} was on another tracking server or experiment; "
                          "the run logs to a new one", flush=True)
                continued["mlflow"] = run is not None
                if run is None:
                    run = mlflow.start_run(run_name=run_root.name)
            except Exception as e:  # the server went down since `check_sinks` reached it
                raise UserError(f"observability.mlflow_tracking_uri: {shown_uri(mlflow_uri)}: {first_line(e, mlflow_uri)}") from None
            ids["mlflow"] = {"tracking_uri": shown_uri(mlflow_uri), "run_id": run.info.run_id,  # (no credentials)
                             "experiment": mlflow_experiment}
            self._mlflow = mlflow
            # by id: MLflow's active run is per thread, and the M-step's live step lines are logged from another
            # (without it they started a stray run of their own)
            self._mlflow_run = run.info.run_id
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise UserError(MISSING["wandb"]) from None
            prior = ids.get("wandb") or {}
            # console="off": W&B would otherwise wrap the driver's stdout/stderr (progress bars, Ray's logs)
            try:
                self._wandb = wandb.init(project=wandb_project, entity=wandb_entity, mode=wandb_mode,
                                         id=prior.get("id"), resume="allow", name=run_root.name,
                                         dir=os.environ.get("WANDB_DIR") or str(run_root),
                                         settings=wandb.Settings(console="off"))
            except wandb.Error as e:  # e.g. online without `wandb login`
                raise UserError(f"observability.wandb_project: W&B could not start a run "
                                f"({first_line(e, limit=200)})") from None
            if config:  # a resumed run may have changed observability.* etc.: the newest config wins
                self._wandb.config.update(_without_credentials(config), allow_val_change=True)
            # (W&B continues the run of a known id: resume="allow")
            continued["wandb"] = self._wandb.id == prior.get("id") and prior.get("project") == wandb_project
            ids["wandb"] = {"id": self._wandb.id, "project": wandb_project}
            self._wandb_axes: set[str] = set()
        legacy = set(committed) | {step_key(split_key(k)[0]) for k in committed if k.endswith("/improve")}
        # what each dashboard has taken: a new one (a new MLflow run, a fresh TensorBoard folder) nothing yet
        self._sent = {name: set(prior_sent[name] if prior_sent[name] is not None else legacy) if was else set()
                      for name, was in continued.items()}
        if tensorboard:
            ids.setdefault("tensorboard", {})
        self._ids = ids  # (a dashboard off in this invocation keeps its record, for when it is on again)
        self._ids_path, self._lock = ids_path, threading.Lock()
        self._steps_new: dict = {}  # iteration -> dashboards that began its M-step's step lines at a restart
        self._record()
        if tensorboard:
            self._tb = _tb_writer(self._tb_dir)

    # ------------------------------------------------------------------ what each dashboard has taken
    def _record(self) -> None:
        """tracking.json with each dashboard's list of taken keys (under a lock: the M-step's step lines arrive on
        another thread)."""
        ids = {k: dict(v) for k, v in self._ids.items()}
        for name, sent in self._sent.items():
            ids.setdefault(name, {})["sent"] = sorted(sent)
        atomic_write_text(self._ids_path, json.dumps(ids, indent=1, sort_keys=True))

    def _mark(self, key: str, names) -> None:
        if not names:
            return
        with self._lock:
            fresh = [n for n in names if key not in self._sent[n]]
            for name in fresh:
                self._sent[name].add(key)
            if fresh:
                self._record()

    def unsent(self, committed) -> dict[str, list[str]]:
        """Per dashboard, the keys of `committed` (manifest keys, oldest first) it has not taken, each committed
        M-step's step lines ("t/improve_step") just before its "t/improve"."""
        keys = []
        for k in committed:
            if k.endswith("/improve"):
                keys.append(step_key(split_key(k)[0]))
            keys.append(k)
        with self._lock:
            out = {name: [k for k in keys if k not in sent] for name, sent in self._sent.items()}
        return {name: todo for name, todo in out.items() if todo}

    def log(self, iteration, phase: str, lines: list[dict]) -> None:
        """Each dashboard takes the lines on its own: one that fails (an MLflow server down) raises after the
        others have them. A committed phase's key goes on the record of each dashboard that took it."""
        took, failed = self._send(iteration, phase, lines, self._sent)
        if phase != STEP_PHASE:
            self._mark(f"{iteration}/{phase}", took)
        if failed:
            error = RuntimeError("; ".join(failed.values()))
            error.dashboards = [name for name in failed if name not in took]  # (RunDir's catch-up leaves them)
            raise error

    def resend(self, iteration, phase: str, lines: list[dict], to) -> dict[str, str]:
        """A committed phase's lines, or a committed M-step's step lines, to the dashboards `to` that have not
        taken them; returns {dashboard: error} of those that failed. (A paused MLflow fails here: its step lines
        would otherwise go nowhere and count as taken.)"""
        paused = "mlflow" in to and time.monotonic() < self._mlflow_down_until
        took, failed = self._send(iteration, phase, lines, [n for n in to if not (paused and n == "mlflow")])
        self._mark(f"{iteration}/{phase}", took)
        failed = {n: error for n, error in failed.items() if n not in took}  # (a refused name: said when first sent)
        if paused:
            failed["mlflow"] = f"MLflow: {PAUSED}"
        return failed

    def steps_begin(self, iteration, lines: list[dict]) -> None:
        """An M-step (re)starts; `lines`: the step lines its checkpoint holds. A dashboard that has not had this
        M-step's step lines (new to the run since they went live) gets these now; from here every dashboard
        gets the live lines, so the commit sends none again."""
        key = step_key(iteration)
        with self._lock:
            new = [n for n, sent in self._sent.items() if key not in sent]
        if new and lines:
            took, failed = self._send(iteration, STEP_PHASE, lines, new)
            if failed:
                print(f"[restem] warning: the dashboards did not take the {iteration} M-step's earlier step lines "
                      f"({'; '.join(failed.values())})", flush=True)
        self._steps_new[iteration] = set(new)
        self._mark(key, new)

    def steps_again(self, iteration, lines: list[dict]) -> None:
        """Step lines of steps trained again after a restart, which the dashboards that had them do not get twice:
        to the dashboards that began this M-step's lines at its restart (new to the run), which never had them."""
        new = self._steps_new.get(iteration)
        if new:
            took, failed = self._send(iteration, STEP_PHASE, lines, new)
            if failed:
                raise RuntimeError("; ".join(failed.values()))

    def _send(self, iteration, phase: str, lines: list[dict], names) -> tuple[list[str], dict[str, str]]:
        """The lines to the dashboards `names`: those that took them, and {dashboard: error} (one that refused some
        points is in both)."""
        points = []
        for line in lines:
            values = scalars(iteration, phase, line)
            if not values:
                continue
            if phase == STEP_PHASE:
                step, axis = int(line["step"]), f"{_head(iteration, phase, line)}/step"
            else:
                step, axis = (0 if iteration == "control" else int(iteration)), "iteration"
            points.append((values, step, axis))
        took, failed = [], {}
        for name, shown, write in (("tensorboard", "TensorBoard", self._log_tb), ("mlflow", "MLflow", self._log_mlflow),
                                   ("wandb", "W&B", self._log_wandb)):
            if name not in names:
                continue
            try:
                write(points)
            except Exception as e:
                failed[name] = f"{shown}: {first_line(e, self._mlflow_uri, limit=160)}"
                if not isinstance(e, Refused):
                    continue
            took.append(name)
        return took, failed

    def _log_tb(self, points) -> None:
        """A committed phase's points are on disk when this returns, so its record is true after a kill:
        tensorboardX writes from a thread of its own and its flush() does not wait for it, but close() does (the
        next points go to a new event file; TensorBoard reads a folder's files as one). An M-step's step lines go
        asynchronously: a killed driver can lose the last seconds of them from TensorBoard."""
        if self._tb is None:
            return
        with self._tb_lock:  # (step lines arrive on another thread)
            for values, step, _ in points:
                for tag, v in values.items():
                    self._tb.add_scalar(tag, v, global_step=step)
            if any(axis == "iteration" for _, _, axis in points):
                self._tb.close()
                self._tb = _tb_writer(self._tb_dir)
            else:
                self._tb.flush()

    def _log_mlflow(self, points) -> None:
        """One request for the call's points. A server that failed one is not asked again for MLFLOW_PAUSE_S: each
        failed request costs seconds to a minute of the driver's main thread, and an M-step's step lines arrive
        in hundreds (metrics.jsonl keeps every line)."""
        if self._mlflow is None or not points:
            return
        if time.monotonic() < self._mlflow_down_until:  # (said for a phase's lines; an M-step's steps go quietly)
            if any(axis == "iteration" for _, _, axis in points):
                raise RuntimeError(PAUSED)
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for values, step, _ in points for k, v in values.items()]
        client, refused = self._mlflow.MlflowClient(), []
        try:
            for at in range(0, len(metrics), 1000):  # (MLflow's limit per batch)
                chunk = metrics[at: at + 1000]
                try:
                    client.log_batch(self._mlflow_run, metrics=chunk)
                    continue
                except Exception as e:
                    if not _refused_value(e):
                        raise
                for m in chunk:  # a name or value the server refuses (the server is up): the others without it
                    try:
                        client.log_batch(self._mlflow_run, metrics=[m])
                    except Exception as e:
                        if not _refused_value(e):
                            raise
                        refused.append(m.key)
        except Exception:  # a server down or unreachable, or the run deleted there
            self._mlflow_down_until = time.monotonic() + MLFLOW_PAUSE_S
            raise
        if refused:
            raise Refused(f"MLflow refused {len(refused)} of {len(metrics)} metrics ({refused[0]}, ...)")

    def _log_wandb(self, points) -> None:
        if self._wandb is not None:
            for values, step, axis in points:
                # W&B's own step only increases, so each curve gets its x-axis as a metric: the iteration, or
                # the optimizer step of that iteration's M-step
                for tag in values.keys() - self._wandb_axes:
                    self._wandb.define_metric(tag, step_metric=axis)
                    self._wandb_axes.add(tag)
                self._wandb.log({**values, axis: step})

    def close(self, failed: bool = False) -> None:
        """Each dashboard closed on its own; one that cannot be reached at the end of a run is a warning, not a
        failed run (metrics.jsonl holds every line). `failed`: the run stopped on an error, and the dashboards
        say so (MLflow's FAILED, W&B's exit code 1)."""
        held = (("TensorBoard", self._tb, "close", {}),
                ("MLflow", self._mlflow, "end_run", {"status": "FAILED"} if failed else {}),
                ("W&B", self._wandb, "finish", {"exit_code": 1} if failed else {}))
        self._tb = self._mlflow = self._wandb = None
        for name, sink, end, kwargs in held:
            if sink is None:
                continue
            try:
                getattr(sink, end)(**kwargs)
            except Exception as e:
                print(f"[restem] warning: {name} did not close its run ({first_line(e, self._mlflow_uri, limit=200)})",
                      flush=True)
