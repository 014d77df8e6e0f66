"""The ReST^EM loop (Singh et al. 2023, Algorithm 1), one named, timed line per phase.

    restem-ray run config.yaml --out RUN [--resume]      # or: restem-ray demo

Every phase records itself in the run directory's manifest when it finishes; a resumed run skips
finished phases (and finished E-step shards) and redoes only the rest.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .adaptive import RoundPlanner
from .config import RestemConfig, dump_config
from .data import durable_replace, whole_parquet, write_parquet
from .errors import RunError, StopAfter, UserError
from .faults import crash_point
from .observability import MetricsSink, check_sinks
from .evaluation import score_split
from .pool import EStepPool, chunked
from .prompts import Task, load_task, stop_source, with_stop
from .remote import is_uri
from .report import print_table, write_plot, write_problem_history
from .sampling import SampleSpec, with_draw
from .selection import keepable, problem_stats, select, truncated
from .storage import RunDir, atomic_write_text, problem_set
from .training import improve as train_m_step
from .verdicts import MIN_GRADES, check_infra_errors, check_one_actors_grades, is_infra, verdict_counts
from .verification import check_verifier, load_plugin, resolve_verifier

# What the M-step's metrics.jsonl line carries from the training result.
MSTEP_METRICS = ("loss", "steps", "chosen_step", "valid_reward", "valid_history", "resumed_from_step",
                 "real_token_fraction", "tokens_per_s", "train_seconds", "rows", "rows_dropped_too_long")


PROBATION = ".probation"  # an E-step shard not yet judged: NAME.parquet.probation (restem_ray/mirror.py skips it too)


def waiting_name(shard: Path) -> Path:
    """Where `shard` waits on probation."""
    return shard.with_name(shard.name + PROBATION)


class Samplers:
    """At most one live `EStepPool`, rebuilt when the model changes and closed before the M-step."""

    def __init__(self, cfg: RestemConfig):
        self.cfg, self.pool = cfg, None

    def get(self, model: str) -> EStepPool:
        if self.pool is not None and self.pool.model != model:
            self.close()
        if self.pool is None:
            self.pool = EStepPool(model, self.cfg.sampling, self.cfg.verification, seed=self.cfg.seed,
                                  trust_remote_code=self.cfg.model.trust_remote_code,
                                  verifier=resolve_verifier(self.cfg.verification.verifier, self.cfg.task.kind))
        return self.pool

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None


def _recorded_sampling(run: RunDir) -> dict:
    """The sampling section a run's config.yaml records ({} where unreadable); a key added to restem-ray since the
    run began is missing from it."""
    import yaml

    try:
        sampling = (yaml.safe_load((run.root / "config.yaml").read_text()) or {}).get("sampling", {})
    except (OSError, yaml.YAMLError, AttributeError):
        return {}
    return sampling if isinstance(sampling, dict) else {}


def _recorded_stop(run: RunDir, key: str = "stop") -> list | None:
    """The stop strings (or `key`: stop_token_ids) a run's config.yaml records it sampled with; None where
    unreadable."""
    stop = _recorded_sampling(run).get(key)
    return stop if isinstance(stop, list) else None


def mstep_name(run: RunDir, name: str, shared: bool) -> str:
    """The M-step's Ray Train run name. Ray Train resumes whatever run of that name it finds in its storage, so
    where runs share one `training.storage_path`, the name holds a digest of this run's location and creation
    time: two runs both called `g1` (or a run removed and started again under the same --out) must not resume
    each other's M-steps."""
    label = f"mstep-{run.root.name}-{name}"
    if not shared:  # the run's own iteration directory
        return label
    where = run.mirror.uri if run.mirror is not None else str(run.root.resolve())
    digest = hashlib.sha256(f"{where} {run.manifest().get('created')}".encode()).hexdigest()[:10]
    return f"mstep-{run.root.name}-{digest}-{name}"


class Driver:
    skip_special = True  # samples decoded without special tokens (the Task's resolved sampling.skip_special_tokens)

    def __init__(self, cfg: RestemConfig, run_dir: str | Path, resume: bool = False, force: bool = False,
                 stop_after: str | None = None, task: Task | None = None):
        self.run = RunDir(run_dir)
        t = cfg.task
        # adapters, valid_split and the prompt layer: every problem rendered once (restem_ray/prompts.py),
        # here or by the caller's input check (`run`), which passes its Task
        task = task or load_task(cfg)
        if resume and task.renderer is not None and task.stop and task.stop == task.renderer.template_stop \
                and not cfg.sampling.stop and _recorded_stop(self.run) == []:
            # a run begun before a zero-shot template's question marker was a stop: it goes on as it sampled
            print(f"[restem] the run was sampled without the stop {list(task.stop)} its template implies now: "
                  "resumed as it was (set sampling.stop to change it)")
            task.stop = ()
        if resume and cfg.model.sampler and task.renderer is not None and not task.renderer.stop_token_ids \
                and task.stop_token_ids and not cfg.sampling.stop_token_ids \
                and _recorded_stop(self.run, "stop_token_ids") == []:
            # a model.sampler run begun before its end-of-turn stop id was added (prompts._sampler_stop)
            print(f"[restem] the run was sampled without the stop token ids {list(task.stop_token_ids)} model.sampler "
                  "needs now: resumed as it was (set sampling.stop_token_ids to change it)")
            task.stop_token_ids = ()
        if resume and not task.skip_special_tokens and cfg.sampling.skip_special_tokens is None \
                and (self.run.root / "config.yaml").is_file() \
                and "skip_special_tokens" not in _recorded_sampling(self.run):
            # a harmony model's run begun before its special tokens were kept: it goes on as it sampled (its
            # shards, scores and M-steps so far were made without them)
            print("[restem] the run was sampled without the special tokens its model writes: resumed as it was (set "
                  "sampling.skip_special_tokens to change it)")
            task.skip_special_tokens = True
        if task.stop != tuple(cfg.sampling.stop):
            print(f"[restem] stop strings {stop_source(cfg, task.renderer)}: {list(task.stop)}")
        if task.stop_token_ids != tuple(cfg.sampling.stop_token_ids):
            print(f"[restem] stop token ids from the chat template's end of turn: {list(task.stop_token_ids)}")
        self.cfg = cfg = with_stop(cfg, task)  # config.yaml records the stops sampled with
        self.train, self.eval_sets, self.seed_rows = task.train, task.evals, task.seed_rows
        self.end_token_id = task.renderer.end_token_id if task.renderer else None  # (rows that ended on no stop id)
        self.split_stop = task.split_stop  # eval splits in another format that stop otherwise
        self.skip_special = task.skip_special_tokens  # (gpt-oss's channels: kept, see prompts.keeps_special_tokens)
        if not self.skip_special and cfg.sampling.skip_special_tokens is None:
            print("[restem] samples keep the special tokens the model writes (its tokenizer's harmony channels; "
                  "sampling.skip_special_tokens)")
        for name, stop in self.split_stop.items():
            print(f"[restem] stop strings of eval split {name}: {list(stop)}")
        self.step_checker = load_plugin(t.step_checker, "task.step_checker") if t.step_checker else None
        check_verifier(cfg, local_sandbox=False)  # a bad plug-in fails before any work (the sandbox: in _run)
        check_sinks(cfg.observability, keep_new_store=True)  # as does a dashboard whose package is missing
        self.resume, self.force = resume, force
        # the eval splits too: a resumed run compares their scores with earlier iterations' (best, patience)
        self.problems = {"train": problem_set(self.train)} | (
            {"seed": problem_set(self.seed_rows)} if self.seed_rows else {}) | {
            f"eval {name}": problem_set(rows) for name, rows in self.eval_sets.items()}
        self.run.validate(dump_config(cfg), resume, force, self.problems)  # the run directory is written in fit()
        if stop_after is not None:
            self.run.stop_after = check_stop_after(stop_after, cfg, self.run if resume else None)
        self.samplers = Samplers(cfg)

    # ------------------------------------------------------------------ the algorithm
    def fit(self) -> dict:
        cfg, base = self.cfg, self.cfg.model.base
        self.run.create(dump_config(cfg), self.resume, self.force, self.problems)
        o = cfg.observability
        if o.tensorboard or o.mlflow_tracking_uri or o.wandb_project:
            self.run.sink = MetricsSink(self.run.root, o.tensorboard, o.mlflow_tracking_uri, o.mlflow_experiment,
                                        wandb_project=o.wandb_project, wandb_entity=o.wandb_entity,
                                        wandb_mode=o.wandb_mode, config=cfg.model_dump(mode="json"),
                                        committed=self.run.manifest()["completed"])
        policy, self.best = base, None                                      # self.best: {"iteration", "valid"}
        self.last_iteration = 0
        failed = True  # (until the loop ends: the dashboards then say how the run ended)
        ended = False  # the loop ended, or stopped at a phase (--stop-after), with every commit on the store
        try:
            self.run.catch_up()  # a resumed run: what a dashboard missed before, e.g. a kill after a commit
            self.evaluate(0, policy)                                             # the base's scores
            for t in range(1, cfg.loop.iterations + 1):
                self.last_iteration = t
                self.run.set(last_iteration=t)  # (the report leaves out later ones an earlier invocation left)
                samples = self.generate(t, cfg.model.sampler or policy)         # E-step: sample + grade
                dataset = self.select(t, samples)                                # keep correct, dedup, cap
                del samples  # (every sample of the iteration, gigabytes at scale: not held through the M-step)
                self.samplers.close()                                            # accelerators change hands
                policy = self.improve(t, base if cfg.training.restart_from_base else policy, dataset)  # M-step
                self.evaluate(t, policy)                                         # greedy pass@1 (+ pass@k)
                if t - self.best["iteration"] >= cfg.loop.patience:
                    print(f"[restem] validation pass@1 has not improved for {cfg.loop.patience} iteration(s): stop")
                    break
            if cfg.control.enabled:
                self.control(base)                                               # seed data only, same budget
            failed, ended = False, True
        except (StopAfter, RunError) as e:  # a run stopped at a phase, or by an error, points at its best iterate
            failed = not isinstance(e, StopAfter)
            if self.best is not None:
                try:
                    self._link_best(self.best["iteration"])
                except Exception:  # (the error that stopped the run, e.g. a lost upload, is the one to report)
                    failed = True
            ended = not failed
            raise
        finally:
            try:
                self.samplers.close()
            finally:
                if self.run.sink is not None:
                    try:  # (after an error or an interrupt nothing is sent: an upload or request may be what failed)
                        self.run.say_behind(send=ended)
                    finally:
                        self.run.sink.close(failed=failed)
        self._link_best(self.best["iteration"])
        print_table(self.run)
        write_plot(self.run)
        summary = write_problem_history(self.run)
        if summary:
            print(f"[restem] {summary}")
        return self.best

    # ------------------------------------------------------------------ phases
    def generate(self, t: int, model: str) -> pa.Table:
        """E-step: `samples_per_problem` samples per train problem (or adaptive rounds), graded as they stream in."""
        if self.run.done(t, "select"):  # resumed past it: what select kept is on disk (train.parquet)
            return pa.table({})
        if self.run.done(t, "generate"):
            return self.run.read_samples(t)
        s = self.cfg.sampling
        spec = SampleSpec(n=s.samples_per_problem, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                          max_tokens=s.max_tokens, stop=tuple(s.stop), stop_token_ids=tuple(s.stop_token_ids),
                          seed=self.cfg.seed * 1000 + t, skip_special_tokens=self.skip_special)
        start, nodes, rounds = time.time(), set(), {}
        kinds = {"adaptive" if p.name.startswith("part-r") else "fixed-K" for p in self.run.samples_dir(t).glob("part-*.parquet")}
        if other := kinds - {"adaptive" if s.adaptive else "fixed-K"}:  # only after a --force resume that changed it
            where = self.run.samples_dir(t)
            raise RunError(f"iteration {t}: {where} holds {other.pop()} E-step shards but sampling.adaptive is "
                           f"{s.adaptive}; remove that folder{self.run.remote_too(where)} to sample the iteration again")
        for stale in self.run.samples_dir(t).glob(f"*.parquet{PROBATION}"):  # (a killed driver's: never judged)
            stale.unlink()
        self._on_probation(t).clear()
        if s.adaptive:
            rounds = self._sample_rounds(t, model, spec, nodes)
        else:
            chunks = chunked(self.train, s.prompts_per_request)
            self._sample_shards(t, model, spec, chunks, [f"part-{i:05d}" for i in range(len(chunks))], nodes)
        table = self.run.read_samples(t)
        if not s.adaptive:  # (adaptive rounds check their own shards)
            got = list(zip(table["id"].to_pylist(), table["sample_index"].to_pylist()))
            want = {(p["id"], j) for p in self.train for j in range(s.samples_per_problem)}
            if len(got) != len(want) or set(got) != want:
                # shards written under other settings (a --force resume that changed prompts_per_request,
                # samples_per_problem or the train file): some problems sampled twice, others never
                out = self.run.samples_dir(t)
                raise RunError(f"iteration {t}: the shards in {out} do not hold one sample per (problem, sample "
                               f"index) of this E-step (its settings changed since they were written); remove that "
                               f"folder{self.run.remote_too(out)} to sample the iteration again")
        line = {"seconds": round(time.time() - start, 2), "samples": table.num_rows,
                "correct": int(pa.compute.sum(table["reward"]).as_py() or 0),
                "completion_tokens": int(pa.compute.sum(table["completion_tokens"]).as_py() or 0)}
        ok = keepable(table, self.cfg.selection.keep_truncated)  # (solved: what select may keep, not a cut sample)
        solved = [r["id"] for r, keeps in zip(table.select(["id", "reward"]).to_pylist(), ok) if r["reward"] >= 1.0 and keeps]
        # correct counts the verifier's verdicts; a correct sample selection may not keep (cut at max_tokens) is
        # counted apart, and accept_rate is what selection may accept, as in problems.parquet
        line["correct_truncated"] = line["correct"] - len(solved)
        line["accept_rate"] = len(solved) / max(1, line["samples"])
        line["replica_nodes"] = sorted(nodes)  # Ray nodes the replicas ran on (empty if all shards were on disk)
        line["truncated"] = sum(truncated(table))  # ended on sampling.max_tokens
        line["verdicts"] = verdict_counts(table["verdict"].to_pylist())
        # pass@K on the train problems at the sampling temperature: how many problems can feed the M-step. The
        # adaptive E-step draws a different number per problem (fewer once solved, or when the budget runs out):
        # the share it solved is no pass@n of any one n
        solved_share = len(set(solved)) / max(1, len(self.train))
        line["train solved" if s.adaptive else f"train pass@{s.samples_per_problem}"] = solved_share
        self.run.complete(t, "generate", [line | rounds])
        return table

    def _sample_shards(self, t: int, model: str, spec: SampleSpec, chunks: list[list[dict]], names: list[str],
                       nodes: set, desc: str | None = None, last: bool = True) -> None:
        """Sample and grade the chunks whose shard (RUN/iter_t/samples/NAME.parquet) is not on disk yet. `last`:
        the E-step ends with these (an adaptive round is not the last: shards on probation wait for later ones)."""
        out = self.run.samples_dir(t)
        # (a shard torn by a machine crash, from before shards were fsynced, is sampled again)
        todo = [i for i in range(len(chunks)) if not whole_parquet(out / f"{names[i]}.parquet")]
        # this E-step's grades so far, in this process: a small shard is judged with them; until they are enough
        # to judge, shards with failed grades wait on probation under a name no reader but the adaptive planner
        # takes (NAME.parquet.probation, not uploaded), and become shards once the grades are enough, or when the
        # E-step ends; if the stop comes they are removed, and a driver killed meanwhile leaves only them (removed
        # as the E-step starts again: sampled and graded again)
        graded = self.__dict__.setdefault("_graded", {}).setdefault(t, Counter())
        probation = self._on_probation(t)
        if not todo:
            if last:
                self._promote(t)
            return

        def save(j: int, rows: list[dict]) -> None:
            # a shard graded mostly by a broken sandbox/plug-in stops the run before it is saved
            verdicts = [r["verdict"] for r in rows]
            check_infra_errors(verdicts, self.cfg.verification.max_infra_error_rate,
                               f"iteration {t}, E-step shard {names[todo[j]]}", before=graded)
            shard = out / f"{names[todo[j]]}.parquet"
            # (once one waits, every later shard waits with it: an adaptive round's plan rests on the rounds
            # before it, and a removed shard must take every shard planned after it along)
            if probation or (graded["all"] < MIN_GRADES and any(map(is_infra, verdicts))):
                probation.append(waiting_name(shard))
                write_parquet(probation[-1], pa.Table.from_pylist(rows))
            else:
                write_parquet(shard, pa.Table.from_pylist(rows))
                self.run.saved(shard)  # a URI run directory: uploaded now, not at the commit
            if graded["all"] >= MIN_GRADES and probation:  # judged with every grade so far (this shard, if of 16
                # or more, was judged alone), then shards
                first = probation[0].name[: -len(f".parquet{PROBATION}")]
                check_infra_errors([], self.cfg.verification.max_infra_error_rate,
                                   f"iteration {t}, E-step shard {first}", before=graded)
                self._promote(t)
            crash_point(f"{t}/generate/shard")
            crash_point(f"{t}/generate/{names[todo[j]]}")  # e.g. 1/generate/part-r002-00000: mid-round kills
        def judge(j: int, rows: list[dict]) -> None:  # one verifier actor's piece of a shard
            check_one_actors_grades([r["verdict"] for r in rows], self.cfg.verification.max_infra_error_rate,
                                    f"iteration {t}, E-step shard {names[todo[j]]}")

        pool = self.samplers.get(model)
        try:
            pool.run([chunks[i] for i in todo], spec, on_chunk=save, on_piece=judge, desc=desc or f"E-step {t}")
        except RunError:  # (the stop: what waits goes, and is sampled again on resume)
            for p in probation:
                p.unlink(missing_ok=True)
            probation.clear()
            raise
        if last:
            self._promote(t)  # (an E-step of fewer grades than it takes to judge: its shards stand as they are)
        nodes.update(pool.nodes)

    def _on_probation(self, t: int) -> list[Path]:
        """This process's shards of iteration t's E-step waiting to be judged (NAME.parquet.probation)."""
        return self.__dict__.setdefault("_probation", {}).setdefault(t, [])

    def _promote(self, t: int) -> None:
        """Shards on probation become shards: judged, or the E-step ended before it had grades enough to judge."""
        probation = self._on_probation(t)
        for p in probation:
            shard = p.with_name(p.name[: -len(PROBATION)])
            durable_replace(p, shard)
            self.run.saved(shard)  # a URI run directory: uploaded now, not at the commit
        probation.clear()

    def _sample_rounds(self, t: int, model: str, spec: SampleSpec, nodes: set) -> dict:
        """Adaptive E-step (restem_ray/adaptive.py): rounds of samples for the problems still open, each round's
        shards named part-rRRR-CCCCC. The plan depends only on earlier rounds' rows, so a resumed E-step replays
        the finished rounds from their shards and samples only what is missing."""
        s, sel = self.cfg.sampling, self.cfg.selection
        prior = self.run.iter_dir(t - 1) / "problems.parquet" if t > 1 else None
        planner = RoundPlanner(
            [p["id"] for p in self.train], round_size=s.adaptive_round_size,
            max_per_problem=s.max_samples_per_problem or s.samples_per_problem,
            budget=s.budget or len(self.train) * s.samples_per_problem, cap=sel.max_solutions_per_problem,
            close_after_rounds=s.close_after_rounds, dedup=sel.dedup, keep_truncated=sel.keep_truncated,
            prior=({r["id"]: r["pass_rate"] for r in pq.read_table(prior, columns=["id", "pass_rate"]).to_pylist()}
                   if prior is not None and prior.exists() else None))
        by_id = {p["id"]: p for p in self.train}
        planned: set[str] = set()
        while draws := planner.next_round():
            r = planner.rounds
            chunks = chunked([with_draw(by_id[d.id], d.offset, d.n) for d in draws], s.prompts_per_request)
            names = [f"part-r{r:03d}-{i:05d}" for i in range(len(chunks))]
            planned.update(f"{n}.parquet" for n in names)
            self._sample_shards(t, model, spec, chunks, names, nodes, desc=f"E-step {t} round {r}", last=False)
            out = self.run.samples_dir(t)
            shards = [out / f"{n}.parquet" for n in names]  # (or still on probation, until judged)
            rows = [row for p in shards for row in pq.read_table(
                waiting_name(p) if waiting_name(p).exists() else p,
                columns=["id", "sample_index", "completion", "reward", "finish_reason"]).to_pylist()]
            got = [(row["id"], row["sample_index"]) for row in rows]
            if len(set(got)) != len(got) or set(got) != {(d.id, d.offset + j) for d in draws for j in range(d.n)}:
                # shards written under other settings (a --force resume that changed selection or sampling)
                raise RunError(f"iteration {t}: the round-{r} shards in {out} do not hold this plan's samples (the "
                               f"E-step's settings changed since they were written); remove that folder"
                               f"{self.run.remote_too(out)} to sample the iteration again")
            planner.observe(draws, rows)
        self._promote(t)  # the E-step's end: shards still on probation stand
        out = self.run.samples_dir(t)
        extra = sorted(p.name for p in out.glob("part-*.parquet") if p.name not in planned)
        if extra:  # rounds of an earlier plan (a --force resume that lowered the budget): select would read them
            raise RunError(f"iteration {t}: {out} holds shards this E-step's plan does not ({extra[0]}; its settings "
                           f"changed since they were written); remove that folder{self.run.remote_too(out)} to sample "
                           "the iteration again")
        return planner.summary()

    def select(self, t: int, samples: pa.Table) -> Path:
        path = self.run.iter_dir(t) / "train.parquet"
        if not self.run.done(t, "select"):
            sel = self.cfg.selection
            table = select(samples, max_solutions_per_problem=sel.max_solutions_per_problem, dedup=sel.dedup,
                           seed=self.cfg.seed + t, keep_truncated=sel.keep_truncated)
            cut = sum(not ok and r >= 1.0 for ok, r in zip(keepable(samples, sel.keep_truncated),
                                                            samples["reward"].to_pylist()))
            if table.num_rows == 0 and cut:
                # (prompts that imply no stop, e.g. a zero-shot plain-text template, write on to max_tokens: a
                # stop string is the fix there; keep_truncated would train those run-on texts, without an end)
                raise RunError(f"iteration {t}: nothing to train on: all {cut} correct samples ended unfinished, "
                               "most likely on sampling.max_tokens (raise it; where the prompts imply no stop, a plain-text "
                               "template without few-shot exemplars, set sampling.stop; or set "
                               "selection.keep_truncated: true)")
            if table.num_rows == 0:
                raise RunError(f"iteration {t}: the verifier accepted none of {samples.num_rows} samples; nothing to "
                               "train on (a stronger base model, more samples or a higher temperature may help)")
            line = {"kept": table.num_rows, "problems_solved": len(set(table["id"].to_pylist())),
                    "truncated_correct_dropped": cut}
            if self.step_checker is not None:  # kept samples whose answer is right but whose steps are not
                from tqdm import tqdm

                by_id = {p["id"]: p for p in self.train}
                # (tens of thousands of kept samples at scale, each a plug-in call in this process: shown as it goes)
                bad = sum(not self._steps_ok(by_id[r["id"]], r["completion"]) for r in tqdm(
                    table.to_pylist(), desc=f"select {t}: task.step_checker", unit="sample", mininterval=2.0,
                    disable=table.num_rows < 1000))
                line["kept_false_positive_rate"] = bad / table.num_rows
            stats = problem_stats(samples, table, t, sel.keep_truncated)  # what the E-step gave each problem
            if self.cfg.training.mix_seed_data:  # declared deviation: human solutions join the generated ones
                table = pa.concat_tables([table, self._seed_table(table.schema)])
                line["seed_rows_mixed"] = len(self.seed_rows)
            write_parquet(path, table)
            write_parquet(self.run.iter_dir(t) / "problems.parquet", stats)
            crash_point(f"{t}/select")
            self.run.complete(t, "select", [line])
        return path

    def _steps_ok(self, problem: dict, completion: str) -> bool:
        from .verification import call_with_timeout

        try:  # bounded as a verifier plug-in's call is: a checker stuck on one completion must not hang the run
            ok = call_with_timeout(self.step_checker, (problem, completion), self.cfg.verification.answer_timeout_s)
            return float(ok) >= 1.0
        except Exception:  # a checker that cannot read a completion (in time: CallTimeout) does not vouch for it
            return False

    def _seed_table(self, schema: pa.Schema) -> pa.Table:
        rows = [{"id": r["id"], "sample_index": -1, "prompt": r["prompt"], "completion": r["solution"],
                 "stop_token": -1} for r in self.seed_rows]  # human solutions end with the M-step's default end
        return pa.Table.from_pylist(rows, schema=schema)

    def control(self, base: str) -> None:
        """Control arm: the base trained further on the human seed solutions, with as many optimizer steps (so
        training sequences) as the largest M-step took, then evaluated like every iterate ("iteration":
        "control")."""
        from .prompts import load_tokenizer
        from .sft import encode, steps_per_epoch

        d = self.run.root / "control"
        d.mkdir(exist_ok=True)
        if not self.run.done("control", "improve"):
            tc = self.cfg.training
            # (the iterations this run's loop went to; M-steps recorded before "steps" was: from their rows)
            batch = (tc.micro_batch_size, tc.num_workers, tc.grad_accum)
            # an epoch of the rows the M-step keeps: it drops those longer than max_seq_len (long human solutions)
            tok = load_tokenizer(base, trust=self.cfg.model.trust_remote_code)
            kept = sum(len(encode(tok, r["prompt"], r["solution"])[0]) <= tc.max_seq_len for r in self.seed_rows)
            per_epoch = steps_per_epoch(kept, *batch)
            largest = [m.get("steps") or tc.epochs * steps_per_epoch(m.get("rows", 0), *batch)
                       for m in self.run.metrics() if m["phase"] == "improve" and isinstance(m["iteration"], int)
                       and m["iteration"] <= self.last_iteration]
            # A control M-step that left a checkpoint continues with the budget it started with: a resume with
            # more loop.iterations may see a larger M-step, and Ray Train would continue that checkpoint under
            # another schedule. One that left none starts afresh, with the budget of now. (Storage on a URI is
            # not looked at: the budget pinned there is kept.)
            args, m = self._mstep_args("control"), self.run.manifest()
            storage = tc.storage_path or str(d.resolve())
            started = "://" in storage or (Path(storage) / args["name"]).exists()
            pinned = m.get("control_epochs") if started and m.get("control_seed_rows", len(self.seed_rows)) == len(
                self.seed_rows) else None
            # (the last epoch's fill repeats rows: counting rows, 200 seeds for 64 epochs filled to 256 a round
            # trained 28% more sequences than the M-step it was sized to)
            epochs = self.cfg.control.epochs or pinned or max(1, -(-max(largest or [0]) // max(1, per_epoch)))
            self.run.set(control_epochs=epochs, control_seed_rows=len(self.seed_rows))
            data = d / "train.parquet"
            write_parquet(data, self._seed_table(pa.schema([("id", pa.string()), ("sample_index", pa.int64()),
                                                            ("prompt", pa.string()), ("completion", pa.string())])))
            self.samplers.close()
            start = time.time()
            metrics = train_m_step(init_model=base, train_file=data, out_dir=d / "checkpoint",
                                   # (whole epochs: training.max_steps, which sized the M-steps, would override them)
                                   cfg=tc.model_copy(update={"epochs": epochs, "max_steps": None}), seed=self.cfg.seed, storage=d,
                                   **args, **self._step_lines("control"))
            self.run.complete("control", "improve", [{"seconds": round(time.time() - start, 2), "init": base,
                                                      "epochs": epochs, "rows": len(self.seed_rows),
                                                      **{k: metrics[k] for k in MSTEP_METRICS if k in metrics}}])
        self.evaluate("control", str(d / "checkpoint"))

    def improve(self, t: int, init_model: str, dataset: Path) -> str:
        ckpt = self.run.checkpoint_dir(t)
        if not self.run.done(t, "improve"):
            start = time.time()
            metrics = train_m_step(init_model=init_model, train_file=dataset, out_dir=ckpt,
                                   cfg=self.cfg.training, seed=self.cfg.seed + t, storage=self.run.iter_dir(t),
                                   **self._mstep_args(f"iter_{t:03d}"), **self._step_lines(t))
            crash_point(f"{t}/improve")
            self.run.complete(t, "improve", [{"seconds": round(time.time() - start, 2), "init": init_model,
                                               **{k: metrics[k] for k in MSTEP_METRICS if k in metrics}}])
        return str(ckpt)

    def _step_lines(self, iteration) -> dict:
        """The M-step's live step lines go to metrics.jsonl and the dashboards as they arrive."""
        return {"log_every_steps": self.cfg.observability.log_every_steps,
                "on_steps": lambda lines, restart: self.run.log_steps(iteration, lines, restart)}

    def _mstep_args(self, name: str) -> dict:
        s, v = self.cfg.sampling, self.cfg.verification
        # the validation rows as the E-step renders them (adapters, prompt layer), not the raw file
        tc = self.cfg.training
        valid = self.eval_sets["valid"][: tc.eval_problems] if tc.eval_every_steps else None
        return {"name": mstep_name(self.run, name, shared=bool(tc.storage_path)), "valid_problems": valid,
                "verifier": resolve_verifier(v.verifier, self.cfg.task.kind), "verification": v.model_dump(),
                "max_new_tokens": s.max_tokens, "stop": self.split_stop.get("valid", tuple(s.stop)),
                "stop_token_ids": tuple(s.stop_token_ids), "trust_remote_code": self.cfg.model.trust_remote_code,
                "skip_special_tokens": self.skip_special,
                "end_token_id": None if s.stop_token_ids else self.end_token_id}

    def evaluate(self, t: int | str, model: str) -> dict:
        """Greedy pass@1 on every eval split (and pass@k, maj@k when evaluation.k > 0). An iterate's scores
        update the best one so far (valid pass@1; ties keep the earlier), committed with them in one manifest
        write (`best_iteration`): the best iteration and the eval it rests on are never apart. Returns the
        best so far ({"iteration", "valid"})."""
        path = (self.run.root / "control" if t == "control" else self.run.iter_dir(t)) / "eval.json"
        arm = {"arm": "control"} if t == "control" else {}

        def best_with(valid: float) -> dict:
            return {"iteration": t, "valid": valid} if self.best is None or valid > self.best["valid"] else self.best

        if not self.run.done(t, "eval"):
            start, pool, ev = time.time(), self.samplers.get(model), self.cfg.evaluation
            scores = {n: self._score(pool, probs, ev.k_for(n), f"eval {t} {n}", n)
                      for n, probs in self.eval_sets.items()}
            atomic_write_text(path, json.dumps(scores, indent=1))
            crash_point(f"{t}/eval")
            secs = round(time.time() - start, 2)
            fields = {} if t == "control" else {"best_iteration": best_with(scores["valid"]["pass@1"])["iteration"]}
            try:
                self.run.complete(t, "eval", [{"split": n, "seconds": secs, "model": model, **arm, **s}
                                              for n, s in scores.items()], **fields)
            finally:  # (StopAfter at this commit: the best is the one just committed)
                if fields:
                    self.best = best_with(scores["valid"]["pass@1"])
        elif t != "control":
            try:
                valid = json.loads(path.read_text())["valid"]["pass@1"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise RunError(f"{path}: the committed eval of iteration {t} cannot be read ({type(e).__name__}: "
                               f"a damaged run directory: restore it, or remove \"{t}/eval\" from \"completed\" "
                               f"in {self.run.manifest_path}{self.run.remote_too(self.run.manifest_path)} to "
                               "evaluate it again)") from None
            self.best = best_with(valid)
        return self.best

    def _score(self, pool: EStepPool, problems: list[dict], k: int, desc: str, split: str) -> dict:
        s, ev = self.cfg.sampling, self.cfg.evaluation
        return score_split(pool, problems, max_tokens=s.max_tokens, stop=self.split_stop.get(split, tuple(s.stop)),
                           stop_token_ids=tuple(s.stop_token_ids), skip_special_tokens=self.skip_special,
                           chunk_size=s.prompts_per_request,
                           slots=pool.call_slots, k=k, temperature=ev.temperature, top_p=ev.top_p, seed=self.cfg.seed,
                           # (a plug-in's rewards come with no answers to vote on)
                           majority=resolve_verifier(self.cfg.verification.verifier, self.cfg.task.kind) == "math",
                           desc=desc,
                           max_infra_error_rate=self.cfg.verification.max_infra_error_rate)

    def _link_best(self, t: int) -> None:
        """`RUN/best` to iteration t's checkpoint (the base's folder for 0), and the manifest's `best_iteration`
        to t: a resume with fewer `loop.iterations` or a lower `patience` ends on an earlier best than the
        last eval committed, and the link, the manifest and the table must not disagree."""
        if self.run.manifest().get("best_iteration") != t:
            self.run.set(best_iteration=t)
        link = self.run.root / "best"
        if t == 0 and is_uri(self.cfg.model.base):  # nothing local to link to: manifest.json's best_iteration 0
            if link.is_symlink():
                link.unlink()
            return
        target = Path(f"iter_{t:03d}") / "checkpoint" if t > 0 else Path(self.cfg.model.base).resolve()
        tmp = self.run.root / "best.tmp"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(target, tmp)
        os.replace(tmp, link)


PHASES = ("generate", "select", "improve", "eval")


def check_stop_after(key: str, cfg: RestemConfig, run: RunDir | None) -> str:
    """`--stop-after`: a phase of this run (as the manifest names it) that a resumed run has not done yet."""
    keys = ["0/eval", *(f"{t}/{p}" for t in range(1, cfg.loop.iterations + 1) for p in PHASES)]
    keys += ["control/improve", "control/eval"] if cfg.control.enabled else []
    if key not in keys:
        raise UserError(f"--stop-after {key}: not a phase of this run (one of {', '.join(keys[:5])}, ..., {keys[-1]})")
    if run is not None and key in run.manifest()["completed"]:
        raise UserError(f"--stop-after {key}: that phase is already complete in {run.root}")
    return key


def check_reachable(address: str, key: str = "ray.address", timeout_s: float = 10.0) -> None:
    """One line when nothing answers at a cluster address: `ray.init` itself retries for minutes, printing
    a warning every few seconds."""
    import socket

    if address in ("auto", "local"):
        return
    host, sep, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not (sep and host and port.isdigit()):
        raise UserError(f"{key}: {address!r}: expected HOST:PORT (the head's GCS port, e.g. 10.0.0.1:6379), "
                        "ray://HOST:PORT or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise UserError(f"{key}: {address}: cannot reach a Ray cluster there ({e.strerror or e})") from None


# A replica's vLLM engine core (and a tensor-parallel engine's workers) are child processes that vLLM ends only
# from the replica's own exit handlers. A replica killed outright (the OOM killer, Ray's memory monitor) leaves
# them running, holding its GPUs' memory, and its restart on those GPUs fails vLLM's free-memory check. Ray's
# default clean-up (`kill_child_processes_on_worker_exit`) does not run for a crashed worker; with this one each
# worker starts in a process group of its own, which the raylet kills when the worker exits however it exits
# (tests/test_estep_failures.py: the engine core outlived a SIGKILLed replica without it). Ray's other switch,
# the raylet as subreaper, sets SIGCHLD to SIG_IGN in every worker: a child's exit status is then lost, and the
# code sandbox graded a fork bomb "timeout" instead of "runtime_error". Read by the raylet when it starts:
# docker/Dockerfile.* and cluster/local-cluster.sh set it for `ray start` clusters.
KILL_ORPHANS = {"RAY_process_group_cleanup_enabled": "true"}


def init_ray(address: str | None, num_cpus: int | None, key: str = "ray.address", dashboard: bool = True) -> None:
    """Join the given cluster, or start a local Ray sized in logical CPUs.

    Two real cores are not enough logical CPUs for a sampler, verifiers and two training workers to be
    scheduled, so a local Ray declares at least 4 (phases run one after another, not at once).
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if address or os.environ.get("RAY_ADDRESS"):  # a Ray job's driver gets RAY_ADDRESS from the cluster
        if address:
            check_reachable(address, key)
        ray.init(address=address)
        return
    # One machine is never preempted, so Ray Train's preemption watcher (an actor per M-step) is left out; the
    # local raylet and so every worker inherit this process's environment.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    for k, v in KILL_ORPHANS.items():  # the local raylet kills what a crashed worker leaves
        os.environ.setdefault(k, v)
    # "local": a new Ray of this process's own. Without it ray.init joins the cluster that the machine's last
    # `ray start` left in /tmp/ray/ray_current_cluster, and refuses num_cpus there (a ValueError traceback).
    ray.init(address="local", num_cpus=num_cpus or max(4, os.cpu_count() or 1), include_dashboard=dashboard)
