"""Evaluation metrics: greedy pass@1, unbiased pass@k (Chen et al. 2021), maj@k."""
from __future__ import annotations

import functools
import re
from collections import Counter, defaultdict
from fractions import Fraction

import numpy as np

from .selection import unfinished
from .verification import (CHOICE, RESTATES, _number_in_text, _parse, _terminates, as_number, call_with_timeout,
                           extract_answer, latex_key, seen_prompt, warm_math)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn from n (c correct) is correct.

    Chen et al. 2021, numerically stable form: 1 - prod_{i=n-c+1}^{n} (1 - k/i).
    """
    if n < k:
        raise ValueError(f"pass_at_k needs n >= k (n={n}, k={k})")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


_CORRECT = ("correct",)
_NO_ANSWER = ("no answer",)  # (samples without one, a reasoning trace max_tokens cut, vote together: lm-eval's "[invalid]")


VOTE_PARSE_S = 2.0  # math-verify's reading of one wrong answer, in the driver: past it the answer votes as text


@functools.lru_cache(maxsize=1 << 16)
def _vote_key(answer: str) -> tuple:
    """What a wrong answer votes as, so that answers the grader would call equal vote together: a number by its
    value ("1,000", "1000", "1000." are one answer), math by math-verify's reading (`\\frac12`, `\\dfrac{1}{2}`
    and 0.5 are one number; `x+1` and `1+x` one expression), words and what math-verify cannot read in time as
    text without spacing and \\left/\\right. Cached, failures too: a split's samples repeat their answers."""
    answer = _vote_form(answer.replace("\\$", "").replace("\u2212", "-"))  # (as answers_match reads them)
    number = as_number(answer)
    if number is not None:
        return ("number", _number_key(number))
    if not re.fullmatch(r"[A-Za-z\s.,']*", answer):  # (words are no math: "yes" would read as y*e*s)
        _warm()  # the import outside the timer: an alarm inside it would leave sympy half-loaded
        try:  # (off the main thread the call runs in a helper process, warmed up there alike)
            key = call_with_timeout(_math_key, (answer,), VOTE_PARSE_S, warmups=("restem_ray.verification:warm_math",))
        except Exception:  # (a timeout or a parse error: the answer still votes, as text)
            key = None
        if key is not None:
            return key
    return ("text", latex_key(answer).rstrip("."))  # (as the grader finds an expression in a problem's text)


def _vote_form(answer: str) -> str:
    """The answer without what the grader looks past, so that its forms vote together: "x = 5" and "5", "25\\%"
    and "25", "30^\\circ" and "30", "\\text{(C)}", "(C)" and "C"."""
    a = re.sub(r"^[A-Za-z]\s*=\s*(?=\S)", "", _number_in_text(answer.strip()))
    a = re.sub(r"(?:\\?%|\^\s*\{?\\circ\}?|\u00b0)$", "", a).rstrip()  # (answer is stripped: no run of spaces)
    choice = CHOICE.fullmatch(a)
    return choice.group(1) if choice else a


@functools.cache
def _warm() -> None:
    warm_math()


def _math_key(answer: str) -> tuple | None:
    """math-verify's reading as a vote key, all of it under the caller's time limit (a float of `9!!!!` alone
    runs for minutes)."""
    parsed = _parse(answer)
    if not parsed or isinstance(parsed[0], str):
        return None
    expr = parsed[0]
    try:
        if getattr(expr, "is_Rational", False):  # (exact: \\frac{1}{10} votes with 0.1)
            return ("number", _number_key(Fraction(int(expr.p), int(expr.q))))
        if getattr(expr, "is_number", False):
            return ("number", _number_key(float(expr)))
    except (TypeError, ValueError, OverflowError):  # complex, or too large for a float
        pass
    return ("math", str(expr))


def _number_key(x: Fraction | float) -> int | Fraction | float:
    """A value as the grader compares it: a number a decimal writes out exactly (1000000007 is not
    1000000007.0001), a fraction no decimal writes out, or a float, to 12 significant digits (a decimal of it
    and a float's own noise). Python hashes 2, 2.0 and Fraction(2), or 0.5 and Fraction(1, 2), alike: keys of
    either kind compare."""
    if isinstance(x, Fraction) and (x.denominator == 1 or _terminates(x)):
        return int(x) if x.denominator == 1 else x
    return float(f"{float(x):.12g}")


def majority_correct(rows: list[dict]) -> float:
    """maj@k for one problem: whether the most common answer is correct. Rows graded correct all equal the
    reference, so they vote as one answer whatever their form ("\\dfrac{1}{2}", "0.5"); the others vote by
    `_vote_key`, with the correct answer where they read as a correct row does (the right answer graded 0 for
    its steps by task.step_checker, or a grading timeout, still votes for it). Samples without an answer vote
    together for none, and an answer the grader refused for restating the problem votes apart from the reference
    it evaluates to. A tie counts the share of the tied answers that is correct (the expected score of breaking it
    at random), so the score does not depend on the order of the samples."""
    votes: Counter = Counter()
    wrong, correct = [], []
    for r in rows:
        answer = extract_answer(r["completion"], seen_prompt(r), finished=not unfinished(r.get("finish_reason")))
        if r["reward"] >= 1.0:
            votes[_CORRECT] += 1
            correct.append(answer)
        elif answer is None or not answer.strip() or r.get("verdict") == "no_answer":  # (a cut-off one's last number)
            votes[_NO_ANSWER] += 1
        elif r.get("verdict") == RESTATES:
            votes[("restated", latex_key(answer))] += 1
        else:
            wrong.append(_vote_key(answer.strip()))
    # (correct rows' answers are read only where some row was graded wrong: math-verify costs ms per answer)
    correct_keys = {_vote_key(a.strip()) for a in set(correct) if a is not None} if wrong else set()
    for key in wrong:
        votes[_CORRECT if key in correct_keys else key] += 1
    if not votes:
        return 0.0
    top = max(votes.values())
    tied = [a for a, n in votes.items() if n == top]
    return (_CORRECT in tied) / len(tied)


def summarize_greedy(rows: list[dict]) -> dict:
    return {"pass@1": float(np.mean([r["reward"] for r in rows])) if rows else 0.0, "problems": len(rows)}


def summarize_samples(rows: list[dict], k: int, majority: bool = True) -> dict:
    """pass@k and (for answer-graded tasks) maj@k from k samples per problem."""
    by_id: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_id[r["id"]].append(r)
    pk = [pass_at_k(len(v), int(sum(x["reward"] for x in v)), k) for v in by_id.values()]
    out = {f"pass@{k}": float(np.mean(pk))}
    if majority:
        out[f"maj@{k}"] = float(np.mean([majority_correct(v) for v in by_id.values()]))
    return out


def score_split(pool, problems: list[dict], *, max_tokens: int, stop: tuple, chunk_size: int, slots: int = 1, k: int = 0,
                stop_token_ids: tuple[int, ...] = (), skip_special_tokens: bool = True,
                temperature: float = 1.0, top_p: float = 0.95, seed: int = 0, majority: bool = True,
                desc: str = "eval", max_infra_error_rate: float = 1.0) -> dict:
    """Greedy pass@1 (and pass@k, maj@k when k > 0) of the pool's model on `problems`, with the greedy
    grades' verdict counts.

    `pool` is an `EStepPool` (sampler replicas + verifier actors); used by the driver and `restem-ray eval`.
    More than `max_infra_error_rate` of grades from a failing verifier or sandbox is a RunError, not a score.
    Calls hold at most `chunk_size` problems, fewer where that gives each of the pool's `slots` (replicas x
    calls_per_replica) a call: a 500-problem split in calls of 256 kept 14 of 16 replicas idle.
    """
    from .sampling import SampleSpec
    from .verdicts import SCORING, check_infra_errors, check_one_actors_grades, verdict_counts

    chunk_size = max(1, min(chunk_size, -(-len(problems) // max(1, slots))))
    chunks = [problems[i : i + chunk_size] for i in range(0, len(problems), chunk_size)]
    rows: list[dict] = []

    def judge(what: str):  # one verifier actor's grades of a piece of a call
        return lambda i, piece: check_one_actors_grades([r["verdict"] for r in piece], max_infra_error_rate, what,
                                                        SCORING)

    pool.run(chunks, SampleSpec(n=1, temperature=0.0, max_tokens=max_tokens, stop=stop, stop_token_ids=stop_token_ids,
                                skip_special_tokens=skip_special_tokens),
             on_chunk=lambda i, r: rows.extend(r), on_piece=judge(desc), desc=desc)
    check_infra_errors([r["verdict"] for r in rows], max_infra_error_rate, desc, SCORING)
    # what the greedy grades were: timeouts and (up to max_infra_error_rate) grading failures count 0 in pass@1
    scores = summarize_greedy(rows) | {"verdicts": verdict_counts(r["verdict"] for r in rows)}
    if k > 0:
        many: list[dict] = []
        spec = SampleSpec(n=k, temperature=temperature, top_p=top_p, max_tokens=max_tokens, stop=stop, seed=seed,
                          stop_token_ids=stop_token_ids, skip_special_tokens=skip_special_tokens)
        pool.run(chunks, spec, on_chunk=lambda i, r: many.extend(r), on_piece=judge(f"{desc} pass@{k}"),
                 desc=f"{desc} pass@{k}")
        check_infra_errors([r["verdict"] for r in many], max_infra_error_rate, f"{desc} pass@{k}", SCORING)
        scores |= summarize_samples(many, k, majority)
    return scores
