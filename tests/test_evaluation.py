from math import comb

import pytest

from restem_ray.evaluation import majority_correct, pass_at_k, summarize_samples


def reference_pass_at_k(n, c, k):
    """Chen et al. 2021, the combinatorial definition."""
    return 1.0 - comb(n - c, k) / comb(n, k)


@pytest.mark.parametrize("n,c,k", [(10, 0, 1), (10, 1, 1), (10, 3, 5), (20, 7, 10), (5, 5, 3),
                                   (10, 8, 3), (10, 9, 2), (100, 1, 50), (3, 1, 3), (64, 10, 32)])
def test_pass_at_k_matches_reference(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(reference_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_when_fewer_wrong_than_k_is_one():
    # n - c < k: every draw of k contains a correct sample
    assert pass_at_k(10, 8, 3) == 1.0
    assert reference_pass_at_k(10, 8, 3) == 1.0


def test_pass_at_k_rejects_k_above_n():
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_majority_vote_uses_most_common_answer():
    rows = [{"completion": "#### 5", "reward": 0.0}, {"completion": "#### 5", "reward": 0.0},
            {"completion": "#### 7", "reward": 1.0}]
    assert majority_correct(rows) == 0.0
    rows.append({"completion": "x #### 7", "reward": 1.0})
    rows.append({"completion": "#### 7", "reward": 1.0})
    assert majority_correct(rows) == 1.0


def test_a_completion_cut_off_before_its_answer_has_none_however_its_last_number_reads():
    """A sample vLLM stopped at max_tokens mid-solution ("9*2=18. Then we subtract the feed, which is") was graded,
    and voted, by its last number: a right grade by chance, counted in pass@1 and maj@k. Cut off, only an answer
    it marked (####, a box, "the answer is") counts; finished, the last number still does."""
    from restem_ray.verification import grade_math

    cut = "She sells 9 eggs: 9*2=18. Then we subtract the cost of the feed, which is"
    assert grade_math({"answer": "18", "finish_reason": "length"}, cut).verdict == "no_answer"
    assert grade_math({"answer": "18", "finish_reason": "stop"}, cut).verdict == "passed"
    assert grade_math({"answer": "18"}, cut).verdict == "passed"  # (rows without the column: finished)
    assert grade_math({"answer": "18", "finish_reason": "length"}, "#### 18\nAnd then").verdict == "passed"
    rows = [{"completion": cut.replace("18", "20"), "reward": 0.0, "verdict": "no_answer", "finish_reason": "length"},
            {"completion": "9*2=20 so 20", "reward": 0.0, "verdict": "wrong_answer"},
            {"completion": "#### 18", "reward": 1.0, "verdict": "passed"}]
    # no answer, 20 and 18 once each: a 3-way tie (read by its last number, 20 won twice to one)
    assert majority_correct(rows) == pytest.approx(1 / 3)


def test_answers_the_grader_counts_as_equal_vote_together():
    """Every form of the reference answer the grader accepted is one vote, and so are equal wrong answers: a
    string vote split "1,000" / "1000" / "1000." and let two equal wrong answers win."""
    rows = [{"completion": f"#### {a}", "reward": 1.0} for a in ("1,000", "1000", "1000.")]
    rows += [{"completion": "#### 7", "reward": 0.0}] * 2
    assert majority_correct(rows) == 1.0
    rows = [{"completion": a, "reward": 1.0} for a in ("\\boxed{\\dfrac{1}{2}}", "\\boxed{0.5}")]
    rows += [{"completion": a, "reward": 0.0} for a in ("\\boxed{\\frac{1}{3}}", "\\boxed{\\dfrac{1}{3}}",
                                                         "\\boxed{\\left(\\frac13\\right)}", "\\boxed{7,000}",
                                                         "\\boxed{7000}")]
    # 2 correct, 3 x 1/3 (the parenthesised one too, as math-verify reads it), 2 x 7000: 1/3 wins
    assert majority_correct(rows) == 0.0
    assert majority_correct(rows[:4] + rows[5:]) == pytest.approx(1 / 3)  # 2 correct, 2 x 1/3, 2 x 7000: a tie
    assert majority_correct(rows[:4] + rows[5:] + [{"completion": "\\boxed{7000.}", "reward": 0.0}]) == 0.0


def test_wrong_answers_equal_as_math_vote_together():
    """LaTeX forms of one wrong number (\\frac{1}{2}, \\frac12, 0.5) and one expression in two orders are one
    answer each, as the grader would compare them: three such votes beat two correct ones."""
    correct = [{"completion": "\\boxed{5}", "reward": 1.0}] * 2
    half = [{"completion": f"\\boxed{{{a}}}", "reward": 0.0} for a in ("\\frac{1}{2}", "0.5", "\\frac12")]
    assert majority_correct(correct + half) == 0.0
    expr = [{"completion": f"\\boxed{{{a}}}", "reward": 0.0} for a in ("x+1", "1+x", "x + 1")]
    assert majority_correct(correct + expr) == 0.0
    distinct = [{"completion": f"\\boxed{{{a}}}", "reward": 0.0} for a in ("\\frac{1}{3}", "x+2", "\\sqrt{2}")]
    assert majority_correct(correct + distinct) == 1.0


def test_forms_the_grader_looks_past_vote_together():
    """"x = 5" and "5", "25\\%" and "25", "\\text{(C)}" and "C" are one answer to the grader: split, two wrong
    answers of each form lost to three correct ones that four wrong votes should beat."""
    for forms in (("x = 5", "5"), ("25\\%", "25"), ("\\text{(C)}", "C"), ("30^\\circ", "30")):
        rows = [{"completion": "\\boxed{7}", "reward": 1.0}] * 3
        rows += [{"completion": f"\\boxed{{{a}}}", "reward": 0.0} for a in forms for _ in range(2)]
        assert majority_correct(rows) == 0.0, forms


def test_the_right_answer_graded_zero_still_votes_for_it():
    """A sample with the right final answer can get reward 0 (task.step_checker found a wrong step, a grading
    timeout): it read as another wrong answer, split the correct answer's votes and let a wrong one tie or win."""
    rows = [{"completion": "#### 5", "reward": 1.0}, {"completion": "#### 5", "reward": 0.0},
            {"completion": "#### 7", "reward": 0.0}]
    assert majority_correct(rows) == 1.0
    rows = [{"completion": "#### 5", "reward": 1.0}, {"completion": "#### 5.0", "reward": 0.0},
            {"completion": "#### 5", "reward": 0.0}, {"completion": "#### 7", "reward": 0.0}] + \
        [{"completion": "#### 7", "reward": 0.0}] * 2
    assert majority_correct(rows) == 0.5  # 3 votes for 7 against 3 for 5: a tie ...
    assert majority_correct(rows[:-1]) == 1.0  # ... and 3 against 2
    assert majority_correct([{"completion": "#### 1000000008", "reward": 0.0}] * 2
                            + [{"completion": "#### 1000000007", "reward": 1.0}]) == 0.0  # close is not equal
    # a wrong decimal is not the integer it rounds to in 12 digits, and a typeset minus with a unit is the number
    assert majority_correct([{"completion": "#### 1000000007.0001", "reward": 0.0}] * 2
                            + [{"completion": "#### 1000000007", "reward": 1.0}]) == 0.0
    assert majority_correct([{"completion": "#### \u22124°C", "reward": 0.0}] * 2
                            + [{"completion": "#### -4", "reward": 1.0}] + [{"completion": "#### 7", "reward": 0.0}] * 2) == 1.0
    # an answer no float holds votes (as math-verify reads it), and does not end the scoring with a traceback
    assert majority_correct([{"completion": "#### 1e300/3e-300", "reward": 0.0}, {"completion": "#### 5", "reward": 1.0}]) == 0.5


def test_a_tie_scores_the_share_of_tied_answers_that_is_correct_in_any_order():
    rows = [{"completion": "#### 1", "reward": 1.0}, {"completion": "#### 2", "reward": 0.0},
            {"completion": "#### 3", "reward": 0.0}]
    assert majority_correct(rows) == majority_correct(rows[::-1]) == pytest.approx(1 / 3)
    assert majority_correct([{"completion": "no answer", "reward": 0.0}]) == 0.0


def test_summarize_samples_per_problem():
    rows = [{"id": "a", "completion": "#### 1", "reward": 1.0}, {"id": "a", "completion": "#### 2", "reward": 0.0},
            {"id": "b", "completion": "#### 3", "reward": 0.0}, {"id": "b", "completion": "#### 3", "reward": 0.0}]
    s = summarize_samples(rows, 2)
    assert s["pass@2"] == pytest.approx(0.5)
    assert s["maj@2"] == pytest.approx(0.25)  # a: a tie of 1 right and 1 wrong (1/2); b: wrong


def test_a_vote_key_is_bounded_in_time_and_words_are_not_math():
    """math-verify's reading runs under a time limit, its float conversion included (`9!!!!` as a float alone runs
    for minutes); words vote as words ("yes" would read as the product y*e*s, an anagram's equal)."""
    import time

    from restem_ray.evaluation import VOTE_PARSE_S, _vote_key

    start = time.monotonic()
    assert _vote_key("9!!!!") == ("text", "9!!!!")
    assert time.monotonic() - start < VOTE_PARSE_S + 5
    assert _vote_key("yes") != _vote_key("sey") and _vote_key("Yes") != _vote_key("yes")


def test_samples_without_an_answer_vote_together_for_none():
    """A reasoning trace max_tokens cut holds no answer: such samples abstained, and one right sample among three
    unfinished ones won maj@4 (lm-eval's majority vote counts them as one "[invalid]" answer)."""
    prompt = "Solve it.<think>\n"
    rows = [{"prompt": prompt, "completion": "so 7.\n</think>\n\\boxed{7}", "reward": 1.0}]
    rows += [{"prompt": prompt, "completion": "let me try 3, then 5, then", "reward": 0.0}] * 3
    assert majority_correct(rows) == 0.0
    assert majority_correct(rows[:2]) == 0.5  # one right, one without an answer: a tie
    assert majority_correct(rows + [{"prompt": prompt, "completion": "</think> \\boxed{7}", "reward": 1.0}] * 3) == 1.0


def test_an_answer_that_restates_the_problem_does_not_vote_for_the_reference():
    """The grader refuses `\\boxed{\\dbinom{31}{28}}` for "Compute $\\dbinom{31}{28}$" (restates_problem), but it
    reads as 4495: such votes joined the reference's and won maj@k for one right sample."""
    from restem_ray.verification import grade_math

    problem = {"answer": "4495", "prompt": "Compute $\\dbinom{31}{28}$."}
    completions = ["\\boxed{4495}", "\\boxed{\\dbinom{31}{28}}", "\\boxed{\\dbinom{31}{28}}", "\\boxed{4000}",
                   "\\boxed{4000}"]
    rows = [{**problem, "completion": c, "reward": g.reward, "verdict": g.verdict}
            for c in completions for g in [grade_math(problem, c)]]
    assert [r["verdict"] for r in rows][:3] == ["passed", "restates_problem", "restates_problem"]
    assert majority_correct(rows) == 0.0  # 2 restated, 2 x 4000, 1 right: a tie the right answer is not in
    assert majority_correct(rows[:3]) == 0.0
