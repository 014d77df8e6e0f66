"""Metrics beyond metrics.jsonl: TensorBoard event files in RUN/tensorboard/ (tensorboardX, which Ray
already installs) and, when `observability.mlflow_tracking_uri` is set, an MLflow run.

Every numeric field of a committed phase line becomes a scalar `phase/field` (eval lines:
`eval/<split>/pass_at_1`) at step = iteration; the control arm's lines go under `control/`.
`metrics.jsonl` stays the source of truth; these are views of it for the usual dashboards.
"""
from __future__ import annotations

from pathlib import Path

from .errors import UserError


def scalars(iteration, phase: str, line: dict) -> dict[str, float]:
    prefix = "control/" if iteration == "control" else ""
    head = f"{prefix}{phase}/{line['split']}" if phase == "eval" and "split" in line else f"{prefix}{phase}"
    # TensorBoard and MLflow accept neither '@' nor spaces in names: pass@1 -> pass_at_1
    return {f"{head}/{k}".replace("@", "_at_").replace(" ", "_"): float(v) for k, v in line.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("time", "iteration")}


class MetricsSink:
    """Receives each committed phase's metrics lines (`RunDir.complete`)."""

    def __init__(self, run_root: Path, tensorboard: bool = True, mlflow_uri: str | None = None,
                 mlflow_experiment: str = "restem-ray"):
        self._tb = None
        self._mlflow = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(logdir=str(run_root / "tensorboard"), flush_secs=5)
        if mlflow_uri:
            try:
                import mlflow
            except ImportError:
                raise UserError("observability.mlflow_tracking_uri is set but mlflow is not installed "
                                "(pip install mlflow)") from None
            mlflow.set_tracking_uri(mlflow_uri)
            mlflow.set_experiment(mlflow_experiment)
            self._mlflow = mlflow
            self._mlflow_run = mlflow.start_run(run_name=run_root.name)

    def log(self, iteration, phase: str, lines: list[dict]) -> None:
        step = 0 if iteration == "control" else int(iteration)
        for line in lines:
            values = scalars(iteration, phase, line)
            for tag, v in values.items():
                if self._tb is not None:
                    self._tb.add_scalar(tag, v, global_step=step)
            if self._mlflow is not None and values:
                self._mlflow.log_metrics(values, step=step)
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._mlflow is not None:
            self._mlflow.end_run()
            self._mlflow = None
