"""The run directory: resolved config, manifest of completed phases, per-iteration outputs, metrics.

RUN/config.yaml, RUN/manifest.json (the single source of truth for what is complete, written
atomically), RUN/iter_NNN/{samples/part-*.parquet, train.parquet, checkpoint/, eval.json},
RUN/metrics.jsonl (one line per phase per iteration, plus the M-steps' live step lines), RUN/report.png.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from .data import durable_replace
from .errors import RunError, StopAfter, UserError, first_line
from .faults import crash_point


def atomic_write_text(path: Path, text: str, crash_label: str | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    if crash_label:
        crash_point(crash_label)
    durable_replace(tmp, path)


# Keys a resumed run may change: they decide how far the run goes, where it runs and what it reports, not
# what it computes. Samples carry per-(problem, sample) seeds, so they do not depend on how many replicas or
# verifiers draw and grade them; placement and restart limits only decide where and how often actors start.
# Everything else is result-changing: the data, the model, sampling and verification settings, selection,
# training (its worker count sets the global batch), and the E-step shard size (prompts_per_request), which
# a resumed E-step relies on to find its finished shards.
RESUME_SAFE_KEYS = {
    "loop.iterations", "loop.patience",
    "ray.address", "ray.num_cpus", "ray.include_dashboard", "ray.check_resources",
    "sampling.num_replicas", "sampling.max_replicas", "sampling.cpus_per_replica", "sampling.placement_strategy",
    "sampling.placement_timeout_s", "sampling.start_timeout_s", "sampling.max_restarts", "sampling.calls_per_replica",
    "verification.num_workers", "verification.max_workers", "verification.cpus_per_worker", "verification.resources",
    "training.cpus_per_worker", "training.gpus_per_worker", "training.resources_per_worker",
    "training.placement_strategy", "training.max_failures", "training.start_timeout_s",
}
RESUME_SAFE_SECTIONS = ("observability.",)

# The M-step's live lines in metrics.jsonl: {"phase": "improve_step", "iteration": t, "step": s, "loss": ...}
STEP_PHASE = "improve_step"


def problem_set(rows: list[dict]) -> dict:
    """What a resume must find unchanged: how many problems, and a digest of their ids and prompts in order (files
    without ids number their rows: a reordered or replaced file of the same length has the same ids). The prompts
    as the files hold them: a rendered one may carry the day's date (Llama-3's chat template), and its settings
    are config keys that the resume checks anyway."""
    text = "\n".join(f"{r['id']}\t{r.get('raw_prompt', r.get('prompt', ''))}" for r in rows)
    # what the built-in verifiers grade against: a corrected answer or test mid-run would score iterations under two
    # answer keys (a key of its own: runs recorded before it resume, and get it)
    graded = hashlib.sha256()
    for r in rows:
        graded.update(json.dumps([r.get(k) for k in GRADED_FIELDS], default=str).encode() + b"\n")
    return {"count": len(rows), "sha256": hashlib.sha256(text.encode()).hexdigest(), "graded": graded.hexdigest()}


GRADED_FIELDS = ("answer", "test", "entry_point", "input_output")


def _same_problems(was: dict, now: dict) -> bool:
    return all(was.get(k) == now.get(k) for k in ("count", "sha256")) and was.get("graded", now["graded"]) == now["graded"]


def _flatten(tree, prefix: str = "") -> dict:
    out = {}
    for k, v in (tree or {}).items():
        key = f"{prefix}{k}"
        # a resume-safe mapping (custom resources) stays one key, so changing an entry of it stays safe
        if isinstance(v, dict) and v and k not in ("engine_kwargs", "deepspeed", "extra_eval_files") \
                and key not in RESUME_SAFE_KEYS:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def written_by_a_driver(config_yaml: str) -> bool:
    """Whether a config.yaml is a run's own (every section written out, as the driver writes it), not a user's."""
    from .config import RestemConfig

    try:
        tree = yaml.safe_load(config_yaml)
    except yaml.YAMLError:
        return False
    return isinstance(tree, dict) and set(RestemConfig.model_fields) <= set(tree)


def split_key(key: str):
    """A manifest key as (iteration, phase): "3/eval" -> (3, "eval"), "control/improve" -> ("control", "improve")."""
    iteration, phase = key.split("/", 1)
    return (int(iteration) if iteration.isdigit() else iteration), phase


def _same_file(a, b) -> bool:
    """Two absolute paths to one file or folder: config.yaml recorded relative paths resolved through links
    before it recorded them as written (a resume of such a run names the same data through its link)."""
    return (isinstance(a, str) and isinstance(b, str) and a.startswith("/") and b.startswith("/")
            and os.path.realpath(a) == os.path.realpath(b))


class RunDir:
    def __init__(self, root: str | Path, sink=None):
        self.root = Path(root)
        self.sink = sink  # optional MetricsSink: TensorBoard / MLflow views of the committed lines
        # per unfinished M-step, the last step whose line reached the dashboards before a restart trimmed it
        self._shown_steps: dict = {}
        self.manifest_path = self.root / "manifest.json"
        self.metrics_path = self.root / "metrics.jsonl"
        self.stop_after: str | None = None  # "t/phase": end the run cleanly once that phase is committed
        self.mirror = None  # RunMirror when the run directory is a URI: this is its node-local copy

    # --- creation / resume -------------------------------------------------------------------
    def validate(self, config_yaml: str, resume: bool, force: bool = False, problems: dict | None = None,
                 fresh: bool = True) -> None:
        """Everything `create` checks, writing nothing (run before any cluster work). `problems`: {name:
        `problem_set(rows)`} of the problems the run trains on (train, seed), which a resume must find unchanged.
        `fresh`: a new run's folder must hold nothing yet (checked before the work, not again at `create`)."""
        if self.manifest_path.exists() and not resume:
            raise UserError(f"{self.root}: run directory already holds a run (use --resume to continue it)")
        if resume and not self.manifest_path.exists():
            raise UserError(f"{self.root}: nothing to resume (no manifest.json)")
        if fresh and not resume and self.root.is_dir():  # `--out .` would write config.yaml over the user's own
            other = sorted(p.name for p in self.root.iterdir() if not p.name.startswith("."))  # (.driver.lock)
            if other == ["config.yaml"] and written_by_a_driver((self.root / "config.yaml").read_text(errors="replace")):
                other = []  # a start that died between its config and its manifest: this run writes both anew
            if other:
                raise UserError(f"{self.root}: not empty ({', '.join(other[:3])}{', ...' if len(other) > 3 else ''}) "
                                "and holds no run: give a new or empty folder as the run directory")
        parent = next((p for p in [self.root, *self.root.parents] if p.exists()), None)
        if parent is None or not parent.is_dir():
            raise UserError(f"{self.root}: cannot create run directory ({parent} is not a directory)")
        if not os.access(parent, os.W_OK):
            raise UserError(f"{self.root}: run directory is not writable")
        if resume:
            m = self.manifest()  # a damaged manifest fails here, before Ray starts
            self._check_resume_config(config_yaml, force)
            was = m.get("problem_sets") or {}
            changed = [k for k in (problems or {}) if k in was and not _same_problems(was[k], problems[k])]
            if changed and not force:
                # E-step shards are chunks of the train list: another list would sample some problems twice and
                # others never, and an iteration's samples (or the control arm's data) would mix two problem sets
                k = changed[0]
                if all(was[k].get(f) == problems[k][f] for f in ("count", "sha256")):
                    raise UserError(f"{self.manifest_path}: the {k} problems' answers or tests changed since the run "
                                    "was created: resuming would score iterations against two answer keys (restore "
                                    "the data files, or use --force to accept)")
                raise UserError(f"{self.manifest_path}: the {k} problems changed since the run was created "
                                f"({was[k].get('count')} -> {problems[k]['count']} problems, or other ones): resuming "
                                "would mix two problem sets (restore the data files, or use --force to accept)")

    def create(self, config_yaml: str, resume: bool, force: bool = False, problems: dict | None = None) -> None:
        self.validate(config_yaml, resume, force, problems, fresh=False)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"{self.root}: cannot create run directory ({e.strerror})") from None
        atomic_write_text(self.root / "config.yaml", config_yaml)
        if not resume:
            self._write_manifest({"version": 1, "completed": {}, "created": time.time()}
                                 | ({"problem_sets": problems} if problems else {}))
        elif problems and self.manifest().get("problem_sets") != problems:  # an older run, or --force
            self.set(problem_sets=problems)
        self._trim_metrics()

    def _check_resume_config(self, config_yaml: str, force: bool) -> None:
        """Refuse to resume with a changed config unless the change is safe or forced."""
        path = self.root / "config.yaml"
        if not path.is_file():  # written before the manifest: a run with a manifest has one
            raise UserError(f"{path}: missing (a damaged run directory)")
        try:
            old = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError):
            raise UserError(f"{path}: not valid YAML (a damaged run directory)") from None
        if not isinstance(old, dict):
            raise UserError(f"{path}: not a restem-ray config (a damaged run directory)")
        from .config import in_schema, key_default

        old = _flatten(old)
        new = _flatten(yaml.safe_load(config_yaml))
        # a key added to restem-ray since the run was created: the run had its default; one removed since
        # means nothing to this version
        old = {k: v for k, v in old.items() if k in new or in_schema(k)}
        old |= {k: key_default(k) for k in new if k not in old}
        changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k) and k not in RESUME_SAFE_KEYS
                   and not k.startswith(RESUME_SAFE_SECTIONS) and not _same_file(old.get(k), new.get(k))]
        if changed and not force:
            k = changed[0]
            raise UserError(f"{path}: resuming with a changed config ({k}: {old.get(k)!r} -> {new.get(k)!r}"
                            f"{f' and {len(changed) - 1} more' if len(changed) > 1 else ''}); "
                            "only loop.*, ray.*, observability.* and replica/worker counts and placement may "
                            "change (README 'Config changes on resume'; use --force to accept)")

    def lock(self) -> None:
        """One driver per run: hold an exclusive flock on RUN/.driver.lock for this process's life. The kernel
        drops the lock when its holder dies however it dies, so a crashed driver never blocks its own resume;
        the file names the holder for the refusal message. Held already by this object: nothing to do."""
        if getattr(self, "_lock_fd", None) is not None:
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / ".driver.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"{self.root}: cannot create run directory ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"{self.root}: another driver is running this run ({holder}); wait for it to end "
                            "or stop it, then --resume (on NFS a dead machine's lock can outlive it: if that host "
                            f"is gone, remove {self.root / '.driver.lock'})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime())}".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        fd, self._lock_fd = getattr(self, "_lock_fd", None), None
        if fd is not None:
            os.close(fd)

    def _write_manifest(self, m: dict, label: str | None = None) -> None:
        atomic_write_text(self.manifest_path, json.dumps(m, indent=1, sort_keys=True),
                          crash_label=f"manifest:{label}" if label else None)
        if self.mirror is not None:  # the phase's files to the URI, then the manifest (restem_ray/mirror.py)
            self.mirror.push()

    def saved(self, path: Path) -> None:
        """A file finished between commits (an E-step shard): on a URI run directory it goes up now, so a run
        resumed on another machine does not compute it again (restem_ray/mirror.py)."""
        if self.mirror is not None:
            self.mirror.push_file(path.relative_to(self.root).as_posix())

    def remote_too(self, path: Path) -> str:
        """For messages that ask to remove a folder: on a URI run directory, its copy on the store goes too (a
        resume elsewhere would download it again)."""
        if self.mirror is None:
            return ""
        return f" and {self.mirror.uri}/{path.relative_to(self.root).as_posix()}"

    def manifest(self) -> dict:
        try:
            m = json.loads(self.manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{self.manifest_path}: not valid JSON (a damaged run directory)") from None
        if not isinstance(m, dict) or not isinstance(m.get("completed"), dict):
            raise UserError(f"{self.manifest_path}: not a restem-ray manifest (no map of completed phases)")
        return m

    # --- phases ------------------------------------------------------------------------------
    def done(self, iteration: int, phase: str) -> bool:
        return f"{iteration}/{phase}" in self.manifest()["completed"]

    def complete(self, iteration, phase: str, lines: list[dict] = (), **manifest_fields) -> None:
        """Record a finished phase: its metrics lines first, then the manifest (the commit point).

        Each line gets `"phase"` and `"iteration"`; lines of a phase the manifest does not list are
        dropped on resume, so a crash between the two writes leaves no duplicate metrics.
        """
        now = round(time.time(), 3)
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps({"phase": phase, "iteration": iteration, "time": now, **line}) + "\n")
            # on disk before the manifest that commits them: after a power loss the manifest could survive
            # without them, and a committed phase is never written again (report, control budget)
            f.flush()
            os.fsync(f.fileno())
        m = self.manifest()
        m["completed"][f"{iteration}/{phase}"] = now
        m.update(manifest_fields)
        self._write_manifest(m, label=f"{iteration}/{phase}")
        crash_point(f"committed:{iteration}/{phase}")  # (a test's kill between the commit and the dashboards)
        self._to_sink(iteration, phase, lines)
        if f"{iteration}/{phase}" == self.stop_after:
            raise StopAfter(self.stop_after)

    def set(self, **fields) -> None:
        m = self.manifest()
        m.update(fields)
        self._write_manifest(m)

    def log_steps(self, iteration, lines: list[dict], restart: bool = False) -> None:
        """The M-step's live step lines, appended as rank 0 sends them (phase "improve_step"; no commit of
        their own). A (re)started M-step first sends the lines its checkpoint holds (`restart`): they replace
        the iteration's earlier step lines, so after a replaced worker group or a resumed driver each step
        appears once, as in an uninterrupted run. The dashboards cannot take a point back: they got every step
        up to the last line before the restart, and get only later steps (a step trained again from the
        checkpoint is the same computation; where it came out different, metrics.jsonl holds the new value)."""
        if restart:  # the M-step is not committed yet: trimming drops its step lines
            self._trim_metrics()
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps({"phase": STEP_PHASE, "iteration": iteration, **line}) + "\n")
        if restart:  # (a dashboard new to the run: the checkpoint's lines)
            self._sink_call("steps_begin", iteration, list(lines))
        else:
            shown = self._shown_steps.get(iteration, 0)
            again = [x for x in lines if x.get("step", shown + 1) <= shown]
            if again:  # steps trained again after a restart: only to a dashboard new to them
                self._sink_call("steps_again", iteration, again)
            self._to_sink(iteration, STEP_PHASE, [x for x in lines if x.get("step", shown + 1) > shown])

    def _sink_call(self, method: str, *args) -> None:
        """A MetricsSink method about step lines, where the sink has it; a failure is a warning."""
        call = getattr(self.sink, method, None)
        if call is None:
            return
        try:
            call(*args)
        except Exception as e:
            print(f"[restem] warning: the dashboards did not take step lines ({first_line(e, limit=200)})", flush=True)

    def _to_sink(self, iteration, phase: str, lines) -> None:
        """The dashboards' copy of committed lines: an MLflow server down for a while must not end a run of
        hours (metrics.jsonl holds every line; `restem-ray report` reads it). A committed phase's send is followed
        by the phases a dashboard has not taken yet (`catch_up`), to the dashboards that took this one."""
        if self.sink is None:
            return
        failed = ()
        try:
            self.sink.log(iteration, phase, list(lines))
        except Exception as e:
            print(f"[restem] warning: the dashboards did not take the {iteration}/{phase} lines "
                  f"({first_line(e, limit=200)}); metrics.jsonl holds them", flush=True)
            failed = getattr(e, "dashboards", ())  # (nor would they take earlier ones now: one warning per commit)
        if phase != STEP_PHASE:
            self.catch_up(skip=failed)

    def catch_up(self, skip=(), quiet: bool = False) -> None:
        """Send each dashboard the committed phases it has not taken, oldest first (`MetricsSink.unsent`): the
        driver killed between a commit and its send, a server that was down, a dashboard new to the run. A
        dashboard that fails one, or is in `skip`, is left until the next commit. Warns, never raises: the
        dashboards are views of metrics.jsonl. On a URI run directory the dashboards' files go up now, their record
        last, so a resume elsewhere neither sends the phases again nor takes files it lacks for sent."""
        try:
            self._catch_up(skip, quiet)
        except Exception as e:
            print(f"[restem] warning: the dashboards could not catch up ({first_line(e, limit=200)}); "
                  "metrics.jsonl holds every line", flush=True)
        if self.mirror is not None and self.sink is not None:
            try:
                self.mirror.push()  # (what changed since the commit's push: the dashboards' files, tracking.json last)
            except Exception as e:
                lease = getattr(self.mirror, "lease", None)
                if lease is not None and lease.lost:  # another driver took the run: this one stops, as at a commit
                    raise
                print(f"[restem] warning: the dashboards' files did not go up ({first_line(e, limit=200)}); the "
                      "next commit sends them", flush=True)

    def behind(self) -> dict[str, list[str]]:
        """Per dashboard that lacks some, the keys of the committed phases (and M-steps' step lines, "t/improve_step")
        it has not taken."""
        unsent = getattr(self.sink, "unsent", None)
        if unsent is None:
            return {}
        completed = self.manifest()["completed"]
        return unsent(sorted(completed, key=lambda k: completed[k]))

    def say_behind(self, send: bool = True) -> None:
        """At a run's end no later commit sends a dashboard what it missed: with `send` (a run that ended without an
        error) one last catch-up (MLflow, paused for a while after a failed request, is not asked again), then a
        line naming what is still missing. Never raises: it runs as a run ends, whatever ended it."""
        try:
            if send and self.behind():
                self.catch_up(quiet=True)
            behind = self.behind()
        except Exception as e:  # (a lease lost meanwhile: the run is over anyway)
            print(f"[restem] warning: the dashboards could not catch up ({first_line(e, limit=200)})", flush=True)
            return
        if behind:
            names = {"tensorboard": "TensorBoard", "mlflow": "MLflow", "wandb": "W&B"}
            parts = []
            for name, keys in sorted(behind.items()):
                steps = sum(k.endswith("/" + STEP_PHASE) for k in keys)
                part = f"{names.get(name, name)} lacks {len(keys) - steps} committed phase(s)"
                parts.append(part + (f" and the step lines of {steps} M-step(s)" if steps else ""))
            print(f"[restem] warning: {'; '.join(parts)}; the next --resume of this run directory sends them (on a "
                  "finished run it does only that; metrics.jsonl holds every line)", flush=True)

    def _catch_up(self, skip, quiet: bool = False) -> None:
        todo = {name: keys for name, keys in self.behind().items() if name not in skip}
        if not todo:
            return
        by_key: dict[str, list[dict]] = {}
        for m in self.committed_metrics():
            by_key.setdefault(f"{m['iteration']}/{m['phase']}", []).append(m)
        failed, left = {}, 0
        # (each key once, in the order of the first dashboard that lacks it)
        for key in dict.fromkeys(k for keys in todo.values() for k in keys):
            lacking = [name for name, keys in todo.items() if key in keys]
            to = [name for name in lacking if name not in failed]  # (one that failed is left till next time)
            if to:
                failed |= self.sink.resend(*split_key(key), by_key.get(key, []), to)
            left += any(name in failed for name in lacking)
        if failed and not quiet:
            print(f"[restem] warning: the dashboards did not take {left} earlier phase(s) "
                  f"({'; '.join(failed.values())}); the next commit sends them again", flush=True)

    def _trim_metrics(self) -> None:
        """Keep committed lines, and the step lines of committed M-steps (an unfinished M-step sends its step
        lines again from its checkpoint when it resumes)."""
        if not self.metrics_path.exists():
            return
        completed = self.manifest()["completed"]
        keep = []
        for raw in self.metrics_path.read_text().splitlines():
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:
                continue  # a torn last line
            t, phase = line.get("iteration"), line.get("phase")
            if phase == STEP_PHASE:
                if f"{t}/improve" in completed:
                    keep.append(raw)
                elif isinstance(line.get("step"), int):  # sent to the dashboards as it came: not sent again
                    self._shown_steps[t] = max(self._shown_steps.get(t, 0), line["step"])
            elif completed.get(f"{t}/{phase}") == line.get("time"):
                keep.append(raw)
        atomic_write_text(self.metrics_path, "".join(k + "\n" for k in keep))

    def metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        raws = self.metrics_path.read_bytes().splitlines()
        lines = []
        for i, raw in enumerate(raws, 1):
            if not raw.strip():
                continue
            try:
                line = json.loads(raw.decode("utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                if i == len(raws):
                    continue  # a torn last line: the process was killed while appending it
                raise UserError(f"{self.metrics_path}:{i}: not valid JSON") from None
            if not isinstance(line, dict) or "iteration" not in line or "phase" not in line:
                raise UserError(f"{self.metrics_path}:{i}: not a metrics line (needs 'iteration' and 'phase')")
            t = line["iteration"]
            if not (isinstance(t, str) or (isinstance(t, int) and not isinstance(t, bool))) or \
                    not isinstance(line["phase"], str):
                raise UserError(f"{self.metrics_path}:{i}: not a metrics line ('iteration' a number or 'control', "
                                "'phase' a name)")
            lines.append(line)
        return lines

    def committed_metrics(self) -> list[dict]:
        """`metrics()` without lines of a phase the manifest does not list (a driver killed between its two
        writes, not resumed since: a resume drops them too), and with the M-steps' live step lines. (Lines without
        a commit time, written by hand or by early versions, are kept.)"""
        completed = self.manifest()["completed"]
        return [m for m in self.metrics() if m["phase"] == STEP_PHASE or "time" not in m
                or completed.get(f"{m['iteration']}/{m['phase']}") == m["time"]]

    # --- paths -------------------------------------------------------------------------------
    def iter_dir(self, t: int) -> Path:
        d = self.root / f"iter_{t:03d}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def samples_dir(self, t: int) -> Path:
        d = self.iter_dir(t) / "samples"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def checkpoint_dir(self, t: int) -> Path:
        return self.iter_dir(t) / "checkpoint"

    def read_samples(self, t: int) -> pa.Table:
        parts = sorted(self.samples_dir(t).glob("part-*.parquet"))
        # (after select the samples may be deleted: nothing reads them again)
        if not parts and self.done(t, "generate") and not self.done(t, "select"):
            raise RunError(f"{self.samples_dir(t)}: the committed E-step of iteration {t} has no samples files "
                           f"(a damaged run directory: restore them, or remove \"{t}/generate\" from \"completed\" in "
                           f"{self.manifest_path}{self.remote_too(self.manifest_path)} to sample the iteration again)")
        # shards written before a resume may lack a column added since (filled with nulls)
        return pa.concat_tables([self._read_shard(t, p) for p in parts], promote_options="default") if parts else pa.table({})

    def _read_shard(self, t: int, path: Path) -> pa.Table:
        try:
            return pq.read_table(path)
        except (OSError, pa.ArrowException) as e:  # a committed shard damaged since
            committed = (f" and \"{t}/generate\" from \"completed\" in {self.manifest_path}"
                         if self.done(t, "generate") else "")
            raise RunError(f"{path}: a damaged run directory ({first_line(e, limit=120)}); restore the file, or "
                           f"remove it{self.remote_too(path)}{committed} to sample its problems again") from None
