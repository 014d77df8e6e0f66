"""A deliberately wrong verifier for test_learning_signal.py: it accepts exactly the samples the real
math verifier rejects (and that do end in an answer), so the M-step learns from wrong solutions."""
from restem_ray.verification import grade_math


def reward(problem: dict, completion: str) -> float:
    g = grade_math(problem, completion)
    return 1.0 if g.verdict == "wrong_answer" else 0.0
