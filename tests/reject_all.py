"""A plug-in verifier that rejects every sample (tests/test_run_lifecycle.py): the E-step finishes with
nothing correct, so the run cannot go on."""


def reward(problem: dict, completion: str) -> float:
    return 0.0
