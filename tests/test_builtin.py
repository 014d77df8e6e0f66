"""The built-in base model's build (restem_ray/builtin.py): trained on the seed split, kept at its best
validation epoch, and stopped once validation has plateaued."""
import torch

from restem_ray import builtin
from restem_ray.builtin import TinyModelSpec, build_tokenizer, train_base
from restem_ray.tasks.arithmetic import ArithmeticTask


def _spec(**kw):
    return TinyModelSpec(hidden=32, layers=1, heads=1, ffn=64, batch_size=8, eval_every=1, **kw)


def _build(monkeypatch, scores, **kw):
    """train_base on 16 seed rows, with validation scores given in turn; returns (model, history, states seen)."""
    scores, seen = list(scores), []

    def score(model, tokenizer, problems, kind="math", **_):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return scores.pop(0)

    monkeypatch.setattr(builtin, "greedy_accuracy", score)
    rows = ArithmeticTask().splits()["seed"][:16]
    model, history = train_base(_spec(**kw), build_tokenizer(), rows, rows)
    return model, history, seen


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_build_stops_after_patience_evaluations_below_the_best_and_keeps_the_best(monkeypatch):
    model, history, seen = _build(monkeypatch, [0.1, 0.5, 0.5, 0.3, 0.2, 0.4, 0.9, 0.9], epochs=8, patience=3)
    # epochs 4, 5, 6 score below the best (0.5 at epoch 3, the later of two equal scores): stopped after epoch 6,
    # and epoch 7's better score is never reached
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert _same(model.state_dict(), seen[2]) and not _same(model.state_dict(), seen[1])


def test_without_patience_the_build_runs_every_epoch(monkeypatch):
    model, history, seen = _build(monkeypatch, [0.1, 0.5, 0.3, 0.2, 0.1, 0.4], epochs=6, patience=0)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert _same(model.state_dict(), seen[1])


def test_the_default_plateau_stop_keeps_the_cache_keys_of_the_builds_before_it():
    """Runs on the built-in task name its cache folder in model.base: the default stop, which gives the built-in
    seeds the same weights, must not move them (a resume would be refused as a changed config)."""
    from dataclasses import replace

    from restem_ray.builtin import BUILTINS, arithmetic_builtin

    assert BUILTINS["arithmetic"].key() == "3b61f259d628" and BUILTINS["code"].key() == "83a3e23df698"
    assert arithmetic_builtin(1).key() != arithmetic_builtin(0).key()
    full = replace(BUILTINS["arithmetic"], model=replace(BUILTINS["arithmetic"].model, patience=0))
    assert full.key() != BUILTINS["arithmetic"].key()
