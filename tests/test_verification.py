import os
import subprocess
import sys

import pytest

from restem_ray.errors import UserError
from restem_ray.verification import Grade, Verifier, answers_match, as_number, extract_answer, grade_math


@pytest.mark.parametrize("text,answer", [
    (" 12 + 3 = 15 . #### 15", "15"),
    ("so the answer is \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),
    ("\\boxed{x^{2}}", "x^{2}"),
    ("we get 3 then 1,234.", "1,234"),
    ("no digits here", None),
    ("#### ", None),
    # a markdown heading is not the answer: the \\boxed{} after it is
    ("#### Step 1: add\n6 x 7 = 42\n#### Step 2: Conclude\nThe answer is \\boxed{42}", "42"),
    ("#### Final Answer\n\\[\n\\boxed{42}\n\\]", "42"),
    ("#### 72 clips", "72"),
    ("#### Final Answer: 42", "42"),
    ("#### \\frac{1}{2}", "\\frac{1}{2}"),
    ("so it is \\fbox{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("The answer is \u22125.", "\u22125"),
    ("half is .5", ".5"),
    # lm-eval's strict GSM8K phrase beats a number after it; a LaTeX answer after the phrase is not its digit
    ("The answer is 18. That is 3 more than the 15 she had.", "18"),
    ("so $\\boxed{2\\sqrt{2}}$.\nFinal Answer: The final answer is $2\\sqrt{2}$. I hope it is correct.",
     "2\\sqrt{2}"),
    ("costs 18, and then 20, in all", "20"),
    # Minerva's format ends with "The final answer is $X$": X is the boxed answer whole, never its first number
    ("so $\\boxed{3, 5}$.\nFinal Answer: The final answer is $3, 5$. I hope it is correct.", "3, 5"),
    ("so $\\boxed{6-5i}$.\nFinal Answer: The final answer is $6 - 5i$. I hope it is correct.", "6-5i"),
    ("so $\\boxed{3\\pi}$.\nFinal Answer: The final answer is $3 \\pi$. I hope it is correct.", "3\\pi"),
    ("The answer is 3 more than that, so 15 + 3 = 18.\nTom has 18 apples.", "18"),
    ("The total is $\\boxed{18}$.\n\nI put the final answer in \\boxed as requested.", "18"),
    ("#### Final Answer\nThe total is 18.", "18"),
    ("MATH writes $\\boxed 5$ too", "5"),
    ("\\[\\boxed \\pi\\]", "\\pi"),
    ("18 apples. I will give the result in \\boxed form.", "18"),
    # without a box: Minerva's sentence gives its whole math, lm-eval's GSM8K phrase its number
    ("Final Answer: The final answer is $[2,5)$. I hope it is correct.", "[2,5)"),
    ("Final Answer: The final answer is $3, 5$. I hope it is correct.", "3, 5"),
    ("Final Answer: The final answer is $-\\frac{2}{3}$. I hope it is correct.", "-\\frac{2}{3}"),
    ("#### Solution\nShe has 5 + 13 = 18 apples.\nThe answer is 18.", "18"),
    ("The answer is 18, which is 3 more than 15.", "18"),
    ("So the answer is 18 (5 more than the 13 she had).", "18"),
    ("The answer is $18.00, since 2 items cost $9 each.", "18.00"),
    # currency dollars are not math delimiters; an escaped one is money inside the math; units in \\text{} are math
    ("So the answer is $10 + $8 = $18.", "18"),
    ("The answer is $18 each, or $36 total.", "36"),
    ("The answer is 4 per box, for a total of 20.", "20"),
    ("The answer is 18 each.", "18"),
    ("Final Answer: The final answer is $\\$18.90$. I hope it is correct.", "\\$18.90"),
    ("Final Answer: The final answer is $6\\sqrt{3}\\text{ square inches}$. I hope it is correct.",
     "6\\sqrt{3}\\text{ square inches}"),
    # a markdown `####` heading is no answer, wherever it stands; a bold `####` answer is one
    ("#### Step 1: Eggs left\n16 - 3 - 4 = 9\n#### Step 2: Earnings\n9 * 2 = 18\n\nJanet makes $18 every day.", "18"),
    ("The answer is $\\boxed{18}$.\n\n#### Verification\nCheck: 9 x 2 = 18.", "18"),
    ("The answer is 18.\n\n#### Double-check\n9 * 2 = 18, 2 + 2", "18"),
    ("#### **18**", "18"),
    ("#### x = 5", "x = 5"),
    ("#### x^2+2x+1", "x^2+2x+1"),
    ("#### Answer: n(n+1)/2", "n(n+1)/2"),
    ("#### {1, 2}", "{1, 2}"),
    ("#### infinity", "infinity"),
    ("#### F", "F"),
    ("#### Eggs left\n16 - 3 - 4 = 9", "9"),
    ("#### Total: 18", "18"),
    ("#### The total is 18", "18"),
    ("#### Result\nShe earns $18 per day.", "18"),
    ("#### 18\n\n#### Note\nEach of the 9 eggs sells for 2.", "18"),
    ("#### Explanation: 9 eggs at 2\n#### 18", "18"),
    ("#### New York", "New York"),
    ("#### **Final Answer:** Janet makes **$18** per day.\n\nThis assumes all 9 eggs are sold.", "18"),
    ("#### x+1\n\nI hope it is correct for 3 cases.", "x+1"),
    ("#### Answer - 18", "18"),
    ("#### Final Answer: -18", "-18"),
    ("#### Part 2: Money earned\n9 x 2 = 18\n\nJanet makes $18 a day.", "18"),
    ("#### Case 2: $x < 0$\nthen x = -3", "-3"),
    ("#### 2. Earnings\n9 * 2 = 18", "18"),
    ("#### 18 (9 eggs x $2)", "18"),
    ("Hence, the answer is $18 per day, i.e. 9 eggs times $2.", "18"),
    ("**Answer:** 9 eggs are left, and she earns 9 x $2 = $18.", "18"),
    ("#### Earnings\n9 * 2 = 18", "18"),
    ("The answer is 18.\n\n#### Verification", "18"),
    ("so \\boxed{18}\n#### Step 3: Double-check", "18"),
    ("#### yes", "yes"),
    # chat models' "Answer:" labels, bold or \(..\) numbers, unit words, with an explanation after them
    ("She makes $18.\nAnswer: 18\n\nNote: this assumes all 9 eggs sell at $2 each.", "18"),
    ("**Answer:** 18\n\nNote the 2 markets.", "18"),
    ("The final answer is **18** dollars, since each of the 9 eggs sells for 2.", "18"),
    ("The answer is \\(18\\) dollars, i.e. 9 eggs times 2.", "18"),
    ("Final Answer: 18 dollars per day (9 eggs at $2).", "18"),
    ("Final Answer: $\\frac{3}{4}$ of the 12 cakes", "\\frac{3}{4}"),
    ("The answer is 3 more than the 15 she had, so 18.", "18"),
    ("The answer is 2 squared, which is 4.", "4"),
    ("The answer is 5 dozen, i.e. 60.", "60"),
    ("The answer is 18 per day.\nOver 7 days that is 126.", "18"),
    # several solutions boxed one by one, joined by "and", "or" or a comma, are one answer; an earlier box is not
    ("The solutions are $\\boxed{2}$ and $\\boxed{3}$.", "2, 3"),
    ("So $x=\\boxed{-2}$ or $x=\\boxed{3}$.", "-2, 3"),
    ("First \\boxed{5}.\nThen the answer is \\boxed{7}.", "7"),
    ("so it is \\boxed{5}\n\n\\boxed{10}", "10"),
    ("$$x = \\boxed{2}$$\nand\n$$x = \\boxed{3}$$", "2, 3"),
    # \{ and \} inside a box are characters (a set, a piecewise answer's \left\{), \\ a line break
    ("So $f(x) = \\boxed{\\left\\{ \\begin{array}{cl} x & x<0 \\\\ 2x & x\\ge 0 \\end{array} \\right.}$ here, 0.",
     "\\left\\{ \\begin{array}{cl} x & x<0 \\\\ 2x & x\\ge 0 \\end{array} \\right."),
    ("The set is $\\boxed{\\{1, 2\\}}$.", "\\{1, 2\\}"),
    ("$\\boxed{\\begin{pmatrix} 1 \\\\{2} \\end{pmatrix}}$", "\\begin{pmatrix} 1 \\\\{2} \\end{pmatrix}"),
    # a clause after "the answer is N" explains it: its numbers are not the answer (the last number was taken)
    ("The answer is 20 since she sells 10 eggs instead of 18.", "20"),
    ("The answer is 18 because she sells 9 eggs.", "18"),
    ("The answer is 18: she sells 9 eggs at $2 each.", "18"),
    ("The answer is 12 as she has 4 boxes of 3.", "12"),
    ("The answer is 10 - 2 = 8.", "8"),  # (a hyphen goes on as math, not as a clause)
    # LaTeX after the label without $...$ is the answer, not its last digits
    ("The answer is \\frac{1}{3}.", "\\frac{1}{3}"),
    ("So the answer is 3\\sqrt{2}.", "3\\sqrt{2}"),
    # no answer marker: a last line that computes gives its result, not the numbers it restates after it
    ("She walks 2 km an hour.\nSo, she walked 2 + 4 = 7 kilometers for 2 hours.", "7"),
    ("Each day adds 2.\nSo he runs 2 * 3 = 6 miles on the 13th day", "6"),
    ("First 3 + 4 = 7.\nThen she has 9 left over from 12", "12"),
    # an empty box after the answer's own (a model saying what it did) hides nothing
    ("So $p = \\boxed{\\frac{1}{2}}$. (I wrapped the answer in \\boxed{} as instructed.)", "\\frac{1}{2}"),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_numeric_and_latex_equivalence():
    assert answers_match("1234", "1,234")
    assert answers_match("0.5", "1/2")
    assert not answers_match("42", "43")
    assert answers_match("\\frac{1}{2}", "0.5")
    assert answers_match("2\\sqrt{2}", "\\sqrt{8}")
    assert not answers_match("2\\sqrt{2}", "\\sqrt{3}")
    assert answers_match("-5", "\u22125")
    assert answers_match("-4", "\u22124°C") and answers_match("-4", "-4°C")  # the minus sign with a unit too
    # the whole answer as text, a number and its unit
    assert answers_match("18", "\\text{18 dollars}") and answers_match("\\text{18 dollars}", "18")
    assert answers_match("-3", "\\textbf{-3 degrees}") and not answers_match("18", "\\text{19 dollars}")
    assert not answers_match("18", "\\text{18 x 2 dollars}")
    assert not answers_match("1", "\\text{1 million}") and not answers_match("3", "\\text{3 Dozen}")  # a multiplier


def test_plain_numbers_compare_exactly():
    """A float tolerance (1e-9 relative) made 1000000007 and 1000000008, or 1e-10 and 0, one answer; math-verify,
    given the same pair as LaTeX (3^{20}), told them apart. A fraction no decimal writes out still matches a
    decimal of it."""
    assert not answers_match("1000000007", "1000000008")
    assert not answers_match("123456789012", "123,456,789,013")
    assert not answers_match("31415926535897932384626433832795", "31415926535897932384626433832794")
    assert not answers_match("0", "1e-10")
    assert answers_match("3486784401", "3,486,784,401") and not answers_match("3486784401", "3486784402")
    assert answers_match("1/3", "0.3333333333") and answers_match("2/7", "0.285714285714")
    assert not answers_match("1/3", "0.33") and not answers_match("0.1", "0.1000000001")
    assert answers_match("72", "72.0") and answers_match("0.5", "1/2") and answers_match("1e5", "100000")
    assert as_number("1e-9999999") == 0 and as_number("1e9999") is None  # no million-digit integers
    # past a float's range on the way (1e300/1e-300) it is no number, as 1e999 is not: no OverflowError either
    assert as_number("1e300/3e-300") is None and not answers_match("1/3", "1e300/1e-300")
    assert not answers_match("1000000007", "3000000022/3")  # no fraction no decimal writes out is an integer
    # a mixed number as plain text: 3 1/2 is 7/2 (math-verify read "3 1/2" as 1); an improper "3 5/2" is none
    assert answers_match("3.5", "3 1/2") and answers_match("\\frac{5}{2}", "2 1/2") and answers_match("-3.5", "-3 1/2")
    assert not answers_match("3", "3 1/2") and not answers_match("11/2", "3 5/2") and as_number("1 200") == 1200


def test_repeating_decimals_and_latex_decimals_compare_by_value():
    """math-verify reads 0.\\overline{36} as 0 (so 0.\\overline{27} passed against it, and 4/11 did not) and rounds
    numbers to 6 decimals (1/2^20 was 0.000001)."""
    assert answers_match("0.\\overline{36}", "\\frac{4}{11}") and answers_match("\\frac{4}{11}", "0.\\overline{36}")
    assert not answers_match("0.\\overline{36}", "0.\\overline{27}") and not answers_match("1.\\overline{27}", "1")
    assert answers_match("\\frac{1}{6}", "0.1\\overline{6}") and answers_match("-0.\\overline{3}", "-\\frac{1}{3}")
    assert not answers_match("\\frac{1}{2^{20}}", "0.000001") and not answers_match("\\frac{1}{8}", "0.1250001")
    assert answers_match("\\frac{1}{8}", "0.125") and not answers_match("\\frac{1}{3}", "0.333333")


def test_a_base_subscript_is_part_of_the_answer():
    """math-verify drops a base subscript: 52_8 matched 52_{10}. A numeral written without one is read in the
    other side's base (the question asked for base 8); x_1 is no numeral in base 1."""
    assert answers_match("52_8", "52_8") and answers_match("52_8", "52_{8}") and answers_match("2A_{16}", "2a_{16}")
    assert answers_match("1011_2", "1011_\\text{2}") and answers_match("52_8", "52")
    assert not answers_match("52_8", "52_{10}") and not answers_match("52_8", "42") and not answers_match("52_8", "42_8")
    assert answers_match("52_{10}", "52") and answers_match("52", "52_{10}")
    assert as_number("52_8") is None and not answers_match("528", "52_8")  # (float() reads 52_8 as 528)


def test_new_answer_rules_stay_fast_on_degenerate_completions():
    """A run of spaces or digits in a sample must not make a rule quadratic: maj@k reads answers in the driver
    without a time limit."""
    import time

    from restem_ray.evaluation import _vote_form

    start = time.perf_counter()
    assert extract_answer("The answer is \\alpha" + " " * 20000 + "x") is not None
    assert _vote_form("5" + " " * 20000 + "x").endswith("x")
    assert not answers_match("1", "1" * 20000 + ".\\overline{3}")
    assert time.perf_counter() - start < 3.0  # (each took seconds: 3.4 s, 3.2 s and a ValueError)


def test_boxing_the_problems_own_expression_is_refused():
    """math-verify evaluates both sides, so boxing the expression the problem asks to compute passed without any
    work done; the M-step would learn to box the question. The answer written as the gold is, or a plain number
    the problem also shows, still passes."""
    binom = {"answer": "4495", "prompt": "Compute $\\dbinom{31}{28}$."}
    assert grade_math(binom, "The answer is $\\boxed{\\dbinom{31}{28}}$.") == Grade(0.0, "restates_problem")
    assert grade_math(binom, "So it is $\\boxed{4495}$.").verdict == "passed"
    root = {"answer": "11\\sqrt2", "prompt": "Simplify $\\sqrt{242}$.", "raw_prompt": "Simplify $\\sqrt{242}$."}
    assert grade_math(root, "$\\boxed{\\sqrt{ 242 }}$").verdict == "restates_problem"
    assert grade_math(root, "$\\boxed{11\\sqrt{2}}$").verdict == "passed"
    assert grade_math({"answer": "\\sqrt{53}", "prompt": "Simplify $\\sqrt{53}$."}, "$\\boxed{\\sqrt{53}}$").verdict == "passed"
    assert grade_math({"answer": "5", "prompt": "What is $2+3$? Not 5.5."}, "$\\boxed{5}$").verdict == "passed"
    # a choice letter the options list, and an expression that is only part of one of the problem's, still pass
    choice = {"answer": "\\text{(C)}", "prompt": "Which is it? (A) 1 (B) 2 (C) 3. Enter the letter of the option."}
    assert grade_math(choice, "$\\boxed{(C)}$").verdict == "passed"
    half_pi = {"answer": "\\frac{\\pi}{2}", "prompt": "Find the x in $[0, \\pi/2]$ where $\\sin x = 1$."}
    assert grade_math(half_pi, "$\\boxed{\\pi/2}$").verdict == "passed"
    f = {"answer": "x^2+1", "prompt": "Let $f(x) = x^2+1$. What is $f(x)$?"}
    assert grade_math(f, "$\\boxed{x^2 + 1}$").verdict == "passed"  # the gold as written
    assert grade_math({"answer": "26", "prompt": "Let $f(x) = x^2+1$. What is $f(5)$?"},
                      "$\\boxed{x^2+1}$").verdict == "restates_problem"
    # the gold as written, however its braces are: MATH's gold "2\sqrt3" is the problem's "2\sqrt{3}"
    side = {"answer": "2\\sqrt3", "prompt": "Triangle $ABC$ has $AB = 2\\sqrt{3}$ and $BC = 4$. Find $AC$."}
    assert grade_math(side, "So $AC = \\boxed{2\\sqrt{3}}$.").verdict == "passed"
    half = {"answer": "\\dfrac12", "prompt": "Is $\\frac{1}{2}$ or $\\frac{1}{3}$ the larger?"}
    assert grade_math(half, "$\\boxed{\\frac{1}{2}}$").verdict == "passed"
    assert grade_math({"answer": "2", "prompt": "What is $\\frac{6}{3}$?"}, "$\\boxed{\\frac63}$").verdict == "restates_problem"


def test_an_interval_asked_for_is_not_answered_by_its_end_points():
    """math-verify matched the open interval (-2,1) with "-2, 1": the roots of x^2+x-2=0, not the solution set of
    x^2+x-2<0. Where the problem asks for interval notation, an answer without any interval is wrong."""
    ask = {"answer": "(-2,1)", "prompt": "Solve $x^2+x-2<0$. Express your answer in interval notation."}
    for wrong in ("$\\boxed{x=-2, x=1}$", "$\\boxed{-2, 1}$", "$\\boxed{\\{-2,1\\}}$"):
        assert grade_math(ask, wrong).verdict == "wrong_answer", wrong
    for right in ("$\\boxed{(-2,1)}$", "$\\boxed{x \\in (-2, 1)}$", "$\\boxed{\\left(-2, 1\\right)}$"):
        assert grade_math(ask, right).verdict == "passed", right
    union = {"answer": "(-\\infty, 2) \\cup (3, \\infty)", "prompt": "Find the domain. Give it in interval notation."}
    assert grade_math(union, "$\\boxed{(-\\infty,2)\\cup(3,\\infty)}$").verdict == "passed"
    pair = {"answer": "(-2,1)", "prompt": "Find the point where the lines meet."}  # (a point: as before)
    assert grade_math(pair, "$\\boxed{(-2,1)}$").verdict == "passed"


@pytest.mark.parametrize("gold, completion", [
    # the quadratic formula's two roots as one fraction with a ± (math-verify reads a ± only outside \frac)
    ("\\frac{1 + \\sqrt{5}}{2}, \\frac{1 - \\sqrt{5}}{2}", "so $x = \\boxed{\\frac{1 \\pm \\sqrt{5}}{2}}$."),
    ("\\frac{-3 + i\\sqrt{7}}{2}, \\frac{-3 - i\\sqrt{7}}{2}", "$\\boxed{\\dfrac{-3\\pm i\\sqrt7}{2}}$"),
    # complex numbers in another form: i is the imaginary unit however it is written
    ("\\dfrac{11}{5}-\\dfrac{2}{5}i", "$\\boxed{\\frac{11-2i}{5}}$"),
    ("\\dfrac{11}{5}-\\dfrac{2}{5}i", "$\\boxed{2.2 - 0.4i}$"),
    ("6+2i", "$\\boxed{2(3+i)}$"),
    ("-1", "$\\boxed{i^2}$"),
    # an AMC option boxed with its value, and a gold that has both
    ("\\text{(C)}", "$\\boxed{\\textbf{(C)}\\ 12}$"),
    ("\\text{(C)}", "$\\boxed{(C)\\ 12}$"),
    ("\\textbf{(C)}\\ 12", "$\\boxed{12}$"),
    ("\\textbf{(C)}\\ 12", "$\\boxed{C}$"),
    ("A", "$\\boxed{(A)}$"),
    # the exact value boxed, then its rounding boxed: either is the answer ("to the nearest tenth")
    ("2\\sqrt{3}", "$\\boxed{2\\sqrt{3}} \\approx \\boxed{3.46}$"),
    ("3.5", "$\\boxed{2\\sqrt{3}} \\approx \\boxed{3.5}$"),
    ("\\textbf{(C) }12", "$\\boxed{(C) 12}$"),
    # the sentence's period inside the box
    ("\\frac{1}{2}", "The probability is $\\boxed{\\frac{1}{2}.}$"),
    ("(1,2)", "$\\boxed{(1,2).}$"),
    # a box, then a check or an aside with an "answer is" in it: the box is the answer
    ("20", "So there are $\\boxed{20}$ ways.\n\nIf order mattered, the answer is 120, but here it does not."),
    ("12", "Thus $\\boxed{12}$. Let me double-check: if the answer is 10, then the sum is off."),
    # every value an answer phrase lists (MATH's "enter all solutions")
    ("3, 5", "Final Answer: The final answer is $3$ or $5$. I hope it is correct."),
    ("2, 3", "The answer is 2, 3."),
    ("-1, 4", "**Answer:** $-1$ and $4$"),
    ("2, 3, 4", "The answer is 2, 3, and 4."),
    ("1, 2, 3", "The answer is 1, 2, or 3."),
    ("2, -2", "The answer is $2$, or $-2$."),
    # the same answer again in another form after a lone ", or" or ", and" is not another value
    ("\\frac{1}{4}", "Final Answer: The final answer is $\\frac{1}{4}$, or $25\\%$. I hope it is correct."),
    ("-2", "The final answer is $-2$, or $x = -2$."),
    ("5", "$\\boxed{5 m}$"),  # (a number and a letter apart: a unit)
    ("3.46", "$\\boxed{x \\approx 3.46}$"),
    ("12.57", "$\\boxed{4\\pi\\approx 12.57\\text{ cm}^2}$"),
    ("3", "The answer is $3$, and $b = 3$."),
    # letters are variables where no unit is written (math-verify took a last h, s or t for a unit and dropped it)
    ("\\pi r^2 h", "$\\boxed{\\pi h r^2}$"),
    ("t^2+3t", "$\\boxed{t(t+3)}$"),
    ("5\\text{ cm}", "$\\boxed{5}$"),  # (a unit written as text is still one)
    # a rounding of the exact value, for a gold rounded as asked
    ("3", "So $\\boxed{2.6 \\approx 3}$."),
    # a minus before the currency sign
    ("-10", "The change in her savings is -$10, so the answer is -$10."),
])
def test_right_answers_in_forms_models_write_pass(gold, completion):
    assert grade_math({"answer": gold, "prompt": "Solve it."}, completion).verdict == "passed", extract_answer(completion)


@pytest.mark.parametrize("gold, completion", [
    ("\\frac{1 + \\sqrt{5}}{2}", "$\\boxed{\\frac{1 \\pm \\sqrt{5}}{2}}$"),  # one root asked, both given
    ("\\pm 3", "$\\boxed{3}$"),
    ("6+2i", "$\\boxed{6+3i}$"),
    ("\\text{(C)}", "$\\boxed{(D)\\ 12}$"),
    ("\\textbf{(C)}\\ 12", "$\\boxed{13}$"),
    ("\\textbf{(C)}\\ 12", "$\\boxed{(D) 12}$"),
    ("0.5", "$\\boxed{5.}$"),
    ("4", "$\\boxed{2\\sqrt{3}} \\approx \\boxed{3.46}$"),
    ("3.5", "$\\boxed{2\\sqrt{2}} \\approx \\boxed{3.5}$"),  # (2.83 is no 3.5: a wrong rounding is no answer)
    ("2", "So $\\boxed{1, 3 \\approx 2}$."),
    ("3.46", "$x=\\boxed{5}$ or $x=\\boxed{2\\sqrt3}\\approx\\boxed{3.46}$"),
    ("6", "The answer is 4 or 6."),  # (read by its last number, the hedge passed)
    ("2", "The answer is 2, or -2."),
    ("1, 2", "The answer is 1, 2, or 3."),
    ("5", "$\\boxed{5m}$"),
    ("6", "The answer is either 4 or 6."),
    ("20", "The answer is 18 or 20 dollars."),
    ("120", "So there are $\\boxed{20}$ ways.\n\nIf order mattered, the answer is 120, but here it does not."),
    ("\\pi r^2 h", "$\\boxed{\\pi r^2}$"),
    ("4s", "$\\boxed{4t}$"),
    ("t^2+3t", "$\\boxed{t^2+3}$"),
    # a hedge between two answers is not the first of them
    ("3", "Final Answer: The final answer is $3$ or $5$. I hope it is correct."),
    ("\\text{(E)}", "$\\boxed{\\text{(E)}}$ or $\\boxed{\\text{(D)}}$"),
    # a ± is two values against a list, not against a pair, an interval or another ±'s values
    ("(2,-2)", "$\\boxed{\\pm 2}$"),
    ("\\frac{3\\pm1}{2}", "$\\boxed{(1,2)}$"),
    ("\\frac{-3\\pm\\sqrt{5}}{2}", "$\\boxed{x \\in \\left(\\frac{-3-\\sqrt5}{2}, \\frac{-3+\\sqrt5}{2}\\right)}$"),
    # i names a variable in an equation
    ("(i,j) = (1,2)", "$\\boxed{(i,j) = (3,4)}$"),
])
def test_wrong_answers_in_those_forms_fail(gold, completion):
    assert grade_math({"answer": gold, "prompt": "Solve it."}, completion).verdict == "wrong_answer", extract_answer(completion)


def test_escaped_dollar_answers_match():
    # MATH writes money as \\boxed{\\$18.90}; math-verify parses a bare "\\$18.90" as nothing
    assert answers_match(r"\$18.90", r"\$18.90")
    assert answers_match(r"\$18.90", "18.90")
    assert answers_match("1200", r"\$1,200")
    assert grade_math({"answer": "108"}, r"So the total is \(\boxed{\$108}\).").verdict == "passed"


def test_thin_space_and_space_thousands_separators():
    """LaTeX's `18\\,000` and `10,\\!000` and SI's `18 000` are numbers (math-verify parses none of them)."""
    for written in ("18\\,000", "18 000", "18,\\!000", "18{,}000", "\\$18\\,000"):
        assert answers_match("18000", written) and answers_match(written, "18000"), written
    assert not answers_match("18000", "18 00") and not answers_match("1,3", "1 3")


def test_spaced_thousands_and_mixed_numbers_are_read_whole_in_phrases_and_as_the_last_number():
    """"The answer is 18 000." was read "000" (passing for the gold 0), "1 1/2 cups" was "1/2"."""
    for text, gold, other in (("The answer is 18 000.", "18000", "0"), ("She earns 18 000 dollars.", "18000", "0"),
                              ("The answer is 1 1/2 cups.", "1.5", "1/2"), ("She needs 2 3/4 cups", "11/4", "3/4")):
        assert grade_math({"answer": gold}, text).verdict == "passed", text
        assert grade_math({"answer": other}, text).verdict == "wrong_answer", text
    # a date's year, or a list of small numbers, is no group of three
    assert extract_answer("On May 5 2026 she had 7") == "7" and extract_answer("Numbers: 1 2 3") == "3"


def test_without_a_marker_a_last_number_inside_a_latex_value_gives_the_value():
    """"The probability is $\\frac{1}{2}$." was read "2" (the denominator), "$3\\sqrt{2}$" "2", "x = \\frac{3}{4}" "3"."""
    for text, gold, part in (("The probability is $\\frac{1}{2}$.", "1/2", "2"),
                             ("Thus the probability is \\frac{1}{2}.", "0.5", "2"),
                             ("So $x = \\frac{3}{4}$", "3/4", "3"), ("x = \\dfrac{3}{4}", "0.75", "3"),
                             ("The side length is $3\\sqrt{2}$.", "3\\sqrt{2}", "2"),
                             ("It equals $\\frac{\\sqrt{3}}{2}$.", "\\frac{\\sqrt{3}}{2}", "2"),
                             ("The slope is $-\\frac{3}{4}$.", "-3/4", "4"),
                             ("The circumference is $2\\pi$.", "2\\pi", "2"),
                             ("The cube root is \\sqrt[3]{9}", "9^{1/3}", "9")):
        assert grade_math({"answer": gold}, text).verdict == "passed", text
        assert grade_math({"answer": part}, text).verdict == "wrong_answer", text
    # a difference's minus is not the value's sign; a number after the value, or a value without the last number,
    # leaves the last number the answer
    assert extract_answer("It is 10 - \\frac{1}{2}") == "\\frac{1}{2}" and extract_answer("5-\\frac12") == "\\frac12"
    assert extract_answer("x-\\sqrt{2}") == "\\sqrt{2}"
    # a minus after a word is the value's sign (read without it, gold 3/4 passed); also Unicode's minus sign
    for text in ("The slope is -\\frac{3}{4}.", "we get \u2212\\frac{3}{4}", "So we get (-\\frac{3}{4})"):
        assert grade_math({"answer": "-3/4"}, text).verdict == "passed", text
        assert grade_math({"answer": "3/4"}, text).verdict == "wrong_answer", text
    # an exponent's digits are no coefficient; two values a space apart are two, not a product (gold 3/8 passed)
    assert extract_answer("x^2\\sqrt{3}") == "\\sqrt{3}" and extract_answer("1,000\\pi") == "1,000\\pi"
    assert grade_math({"answer": "3/8"}, "\\frac{1}{2} \\frac{3}{4}").verdict == "wrong_answer"
    assert extract_answer("Half, $\\frac{1}{2}$, of 10 apples is 5.") == "5"
    assert extract_answer("The area is $28.26$, using \\pi") == "28.26"
    assert extract_answer("The width is \\frac{}{2} cm") == "2"  # (no fraction without its numerator)


def test_a_sentence_or_numbered_heading_on_the_last_hash_line_gives_its_last_number():
    for line in ("#### 3. Total earnings: $18", "#### 9 eggs are left, and she earns $18"):
        assert extract_answer("16 - 3 - 4 = 9 eggs, 9 * 2 = 18.\n" + line) == "18", line
    assert extract_answer("#### 72 clips") == "72" and extract_answer("#### 2\\sqrt{2}") == "2\\sqrt{2}"
    # words and no number: the line, as before (a wrong answer, not a grading failure)
    for line in ("#### (no real solutions)", "#### - see the table above", "#### Final Answer: (see above)"):
        assert extract_answer("Solving gives no real x.\n" + line) == line[5:].replace("Final Answer: ", ""), line
        assert grade_math({"answer": "18"}, "Solving gives no real x.\n" + line).verdict == "wrong_answer", line


def test_lists_of_option_letters_match_however_they_are_wrapped():
    """MATH's "Enter the letters of the correct options, separated by commas": math-verify read \\text{A, C} and
    A, C as different answers."""
    for gold, pred in ((r"\text{A, C}", "A, C"), ("A, C", r"\text{A, C}"), (r"\text{B, E}", "B,E"), ("A, C", "C, A"),
                       ("(A), (C)", r"\text{A,C}")):
        assert answers_match(gold, pred), (gold, pred)
    assert answers_match("A, C", "A, C, C")  # (a set: a letter said twice is one option)
    for gold, pred in (("A, C", "A, D"), ("A, C", "A"), (r"\text{A, C}", r"\text{A, C, E}")):
        assert not answers_match(gold, pred), (gold, pred)
    assert grade_math({"answer": r"\text{A, C}"}, r"The valid options are $\boxed{\text{A, C}}$.").verdict == "passed"


def test_a_comma_list_is_not_a_thousands_separator():
    assert not answers_match("1,3", "13")
    assert answers_match("1,3", "3,1")
    assert answers_match("1,000,000.5", "1000000.5")


def test_grade_math_verdicts():
    assert grade_math({"answer": "7"}, "3 + 4 = 7 . #### 7").verdict == "passed"
    assert grade_math({"answer": "7"}, "#### 8").verdict == "wrong_answer"
    assert grade_math({"answer": "7"}, "I do not know").verdict == "no_answer"


def test_plugin_verifier_and_errors_become_verdicts(tmp_path, monkeypatch):
    (tmp_path / "myver.py").write_text(
        "def score(problem, completion):\n"
        "    if completion == 'boom':\n        raise RuntimeError('x')\n"
        "    return 0.9 if completion == problem['answer'] else 0.1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    v = Verifier("myver:score")
    out = v.grade_batch([{"answer": "a", "completion": "a"}, {"answer": "a", "completion": "b"},
                         {"answer": "a", "completion": "boom"}])
    assert [r["reward"] for r in out] == [1.0, 0.0, 0.0]
    assert out[2]["verdict"] == "verifier_error:RuntimeError"


@pytest.mark.parametrize("spec", ["nosuchmodule_xyz:fn", "json:nosuchfn", "badspec"])
def test_bad_plugin_is_user_error(spec):
    with pytest.raises(UserError, match="verification.verifier"):
        Verifier(spec)


def test_math_verifiers_first_latex_answer_is_graded_not_timed_out(tmp_path):
    # CI's quick demo once graded "#### 480\ufffdv90" 'timeout': the first answer that reached math-verify paid
    # its cold import inside the 5 s limit on a busy machine. Off the main thread (Ray Train's loop, which grades
    # validation) each call runs in a helper process, whose start (Python, restem_ray, math-verify: 0.5 s or more
    # on an idle machine) the first call paid too: a 0.25 s limit makes both cold starts visible here.
    script = tmp_path / "grade.py"
    script.write_text(
        "import sys, threading\n"
        "from restem_ray.config import VerificationConfig\n"
        "from restem_ray.verification import Verifier\n"
        "def grade(out):\n"
        "    v = Verifier('math', VerificationConfig(answer_timeout_s=0.25))\n"
        "    out.append('math_verify' in sys.modules)\n"
        "    out.append(v.grade({'answer': '480'}, ' 330 + 160 = 480 . #### 480\\ufffdv90').verdict)\n"
        "    out.append(v.grade({'answer': '\\\\frac{1}{2}'}, '#### \\\\dfrac{2}{4}').verdict)\n"
        "if __name__ == '__main__':\n"
        "    main, other = [], []\n"
        "    grade(main)\n"
        "    t = threading.Thread(target=grade, args=(other,))\n"
        "    t.start(); t.join()\n"
        "    print(main, other)\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == str([True, "passed", "passed"]) + " " + str([True, "passed", "passed"])


@pytest.fixture
def helper_state(monkeypatch):
    """The module's helper process and remembered start failure, fresh for a test and ended after it; and a count
    of helper processes started."""
    import concurrent.futures as cf

    import restem_ray.verification as v

    monkeypatch.setattr(v, "_pool", None)
    monkeypatch.setattr(v, "_helper_error", None)
    started = []

    class Counted(cf.ProcessPoolExecutor):
        def __init__(self, *a, **kw):
            started.append(1)
            super().__init__(*a, **kw)

    monkeypatch.setattr(cf, "ProcessPoolExecutor", Counted)
    yield started
    if v._pool is not None:
        v._kill(v._pool)


def off_main_thread(fn, *args):
    import concurrent.futures as cf

    with cf.ThreadPoolExecutor(1) as ex:
        return ex.submit(fn, *args).result()


def plugin(tmp_path, monkeypatch, name: str, in_helper: str = "pass") -> str:
    """A plug-in module that rewards 1.0 and, when imported in a helper process, first runs `in_helper`."""
    (tmp_path / f"{name}.py").write_text(
        "import multiprocessing, os, time\n"
        f"if multiprocessing.parent_process() is not None:\n    {in_helper}\n"
        "def reward(problem, completion):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return f"{name}:reward"


HELPER_PLUGIN = '''
import multiprocessing, os
def reward(problem, completion):
    if completion == "die":
        os._exit(3)  # the helper process dies (as out of memory would end it)
    if completion == "late":
        raise TimeoutError("the plug-in's own")
    return 1.0 if completion == problem["answer"] else 0.0
'''


def test_off_the_main_thread_a_dead_helper_is_replaced_and_a_plugins_timeout_error_is_its_own(
        tmp_path, monkeypatch, helper_state):
    (tmp_path / "helper_plugin.py").write_text(HELPER_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    v = Verifier("helper_plugin:reward")
    grades = [off_main_thread(v.grade, {"answer": "a"}, c).verdict for c in ("a", "late", "b", "die", "a")]
    assert grades == ["passed", "verifier_error:TimeoutError", "wrong_answer", "verifier_error:BrokenProcessPool",
                      "passed"]
    assert len(helper_state) == 2  # the plug-in's TimeoutError kept the helper; its death replaced it


def test_a_plugin_the_helper_cannot_import_fails_each_call_at_once_without_new_helpers(
        tmp_path, monkeypatch, helper_state):
    v = Verifier(plugin(tmp_path, monkeypatch, "parent_only", "raise ImportError('not in a helper')"))
    assert v.grade({"answer": "a"}, "a").verdict == "passed"  # the main thread calls it in place
    verdicts = {off_main_thread(v.grade, {"answer": "a"}, "a").verdict for _ in range(3)}
    assert len(verdicts) == 1 and verdicts.pop().startswith("verifier_error:")
    assert len(helper_state) == 1


def test_a_plugin_that_cannot_be_pickled_is_refused_when_the_verifier_is_built(tmp_path, monkeypatch):
    (tmp_path / "wrapped_plugin.py").write_text(
        "def deco(f):\n    def inner(problem, completion):\n        return f(problem, completion)\n    return inner\n"
        "@deco\ndef reward(problem, completion):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match=r"^verification.verifier: 'wrapped_plugin:reward' cannot be pickled"):
        Verifier("wrapped_plugin:reward")


LAZY_PLUGIN = '''
import os, time
MODEL = []
def load():  # a model load: 1.5 s, written to WARM_LOG with the process's pid
    if not MODEL:
        time.sleep(1.5)
        with open(os.environ["WARM_LOG"], "a") as f:
            f.write(f"{os.getpid()}\\n")
        MODEL.append("weights")
def reward(problem, completion):
    load()  # the usual lazy load: the first call pays for it
    return 1.0
def broken():
    raise RuntimeError("no weights at /models/rm")
'''


def test_a_plugins_warmup_runs_once_per_grading_process_outside_the_answer_limit(tmp_path, monkeypatch, helper_state):
    from restem_ray.config import VerificationConfig

    (tmp_path / "lazy_plugin.py").write_text(LAZY_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    log = tmp_path / "warm.log"
    monkeypatch.setenv("WARM_LOG", str(log))
    cold = Verifier("lazy_plugin:reward", VerificationConfig(answer_timeout_s=0.5))
    assert cold.grade({}, "x").verdict == "timeout"  # without a warm-up the load lands in the first sample's limit
    assert not log.exists()
    warm = Verifier("lazy_plugin:reward", VerificationConfig(verifier="lazy_plugin:reward", answer_timeout_s=0.5,
                                                             plugin_warmup="lazy_plugin:load"))
    assert [warm.grade({}, "x").verdict for _ in range(3)] == ["passed"] * 3
    assert off_main_thread(warm.grade, {}, "x").verdict == "passed"  # a new helper process loads before its call
    assert off_main_thread(warm.grade, {}, "x").verdict == "passed"
    pids = log.read_text().split()
    assert len(helper_state) == 1 and len(pids) == 2 and pids[0] == str(os.getpid()) != pids[1]


def test_a_plugins_warmup_is_checked_when_the_verifier_is_built(tmp_path, monkeypatch, helper_state):
    from restem_ray.config import VerificationConfig

    (tmp_path / "lazy_plugin2.py").write_text(LAZY_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))

    def build(verifier, warmup, **kw):
        return Verifier(verifier, VerificationConfig(verifier=verifier, plugin_warmup=warmup), **kw)

    with pytest.raises(UserError, match=r"^verification.plugin_warmup: 'lazy_plugin2:broken' raised RuntimeError: "
                                        r"no weights at /models/rm$"):
        build("lazy_plugin2:reward", "lazy_plugin2:broken")
    with pytest.raises(UserError, match=r"^verification.plugin_warmup: cannot import 'no_such_module'"):
        build("lazy_plugin2:reward", "no_such_module:load")
    with pytest.raises(UserError, match=r"^verification.plugin_warmup: 'lazy_plugin2:missing' is not a callable"):
        build("lazy_plugin2:reward", "lazy_plugin2:missing", warm=False)
    with pytest.raises(ValueError, match=r"verification.plugin_warmup: only a plug-in verifier has one"):
        build("code", "lazy_plugin2:load")
    build("lazy_plugin2:reward", "lazy_plugin2:broken", warm=False).close()  # `check`: imported, not run
    with pytest.raises(UserError, match=r"^verification.plugin_warmup: 'lazy_plugin2:broken' failed in the grading "
                                        r"helper process: RuntimeError: no weights at /models/rm$"):
        off_main_thread(build, "lazy_plugin2:reward", "lazy_plugin2:broken")  # in the helper (M-step validation)


def test_a_second_plugins_import_in_a_running_helper_is_not_charged_to_its_first_call(
        tmp_path, monkeypatch, helper_state):
    from restem_ray.config import VerificationConfig

    cfg = VerificationConfig(answer_timeout_s=0.5)
    first = Verifier(plugin(tmp_path, monkeypatch, "quick_plugin"), cfg)
    second = Verifier(plugin(tmp_path, monkeypatch, "slow_import_plugin", "time.sleep(1.5)  # a heavy import"), cfg)
    assert off_main_thread(first.grade, {}, "x").verdict == "passed"
    assert off_main_thread(second.grade, {}, "x").verdict == "passed"
    assert len(helper_state) == 1  # one helper loaded both


def test_a_helper_killed_while_idle_or_while_starting_is_replaced_not_remembered(tmp_path, monkeypatch, helper_state):
    import time

    import restem_ray.verification as v

    quick = Verifier(plugin(tmp_path, monkeypatch, "quick_plugin2"))
    assert off_main_thread(quick.grade, {}, "x").verdict == "passed"
    for proc in list(v._pool._processes.values()):  # the OOM killer takes the idle helper
        proc.kill()
        proc.join()
    time.sleep(0.5)  # the executor's manager thread marks the pool broken
    assert off_main_thread(quick.grade, {}, "x").verdict == "passed"
    assert len(helper_state) == 2

    dies = Verifier(plugin(tmp_path, monkeypatch, "dies_on_import", "os._exit(9)  # as the OOM killer during a start"))
    assert [off_main_thread(dies.grade, {}, "x").verdict for _ in range(2)] == ["verifier_error:BrokenProcessPool"] * 2
    # the first call loaded it in the running helper, the second in a new one: a death is not remembered
    assert len(helper_state) == 3


R1_PROMPT = "<｜begin▁of▁sentence｜><｜User｜>Janet's ducks lay 16 eggs...<｜Assistant｜><think>\n"
HARMONY_PROMPT = "<|start|>user<|message|>Janet's ducks lay 16 eggs...<|end|><|start|>assistant"


@pytest.mark.parametrize("prompt, completion, answer", [
    # DeepSeek-R1's distills: the prompt opens the trace, the completion closes it; a tentative answer inside
    (R1_PROMPT, "so the answer is 20. Wait, 16 - 3 - 4 = 9 and 9 * 2 = 18.\n</think>\n\nJanet makes **18** dollars.",
     "18"),
    (R1_PROMPT, "Okay, so the answer is 18. Wait, let me recheck the eggs per", None),   # max_tokens cut the trace
    ("Q", "the answer is 20. Hmm.\n</think>\n\nThe answer is 18.", "18"),           # a close with no open
    ("Q", "<think>Maybe \\boxed{20}? No.</think>\nThe answer is 18.", "18"),           # Qwen3: a box in the trace
    ("Q", "<think>first try</think> no <think>second</think>\nSo $\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}"),
    ("Q", "<think>16 - 3 - 4 = 9, so the answer is 18 or", None),                      # cut mid-trace: no answer
    ("<think>\n\n</think>\n\nQ", "No trace: the answer is 7.", "7"),                    # Qwen3, thinking off
    ("Q", "No trace: the answer is 7.", "7"),
    # gpt-oss (harmony, special tokens kept): the final channel's message, not the analysis's tentative answers
    (HARMONY_PROMPT, "<|channel|>analysis<|message|>So the answer is 20? No: 9 * 2 = 18.<|end|><|start|>assistant"
                     "<|channel|>final<|message|>The answer is 18.", "18"),
    (HARMONY_PROMPT, "<|channel|>analysis<|message|>The answer is 18.<|end|><|start|>assistant<|channel|>final"
                     "<|message|>The answer is 20.<|end|>", "20"),
    (HARMONY_PROMPT, "<|channel|>analysis<|message|>16 - 3 - 4 = 9, so the answer is 18 or", None),  # cut
])
def test_a_reasoning_models_answer_comes_after_its_thinking(prompt, completion, answer):
    from restem_ray.verification import grade_math

    assert extract_answer(completion, prompt) == answer
    assert grade_math({"answer": "18", "prompt": prompt}, completion).verdict == (
        "passed" if answer == "18" else "no_answer" if answer is None else "wrong_answer")
    # restem-ray verify: the problem file holds the raw question, the samples file the prompt the model saw
    assert grade_math({"answer": "18", "prompt": "Q", "sampled_prompt": prompt}, completion).verdict == (
        "passed" if answer == "18" else "no_answer" if answer is None else "wrong_answer")


def test_a_think_tag_in_the_question_opens_no_trace():
    assert extract_answer("The answer is 7.", "What does <think> mean in a template? Then add 3 and 4.") == "7"
