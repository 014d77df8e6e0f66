"""A plug-in verifier whose backend is down: it raises on every row (tests/test_infra_errors.py), as a
grading service that cannot be reached would. Every grade becomes `verifier_error:ConnectionError`."""


def reward(problem: dict, completion: str) -> float:
    raise ConnectionError("grading backend unreachable")
