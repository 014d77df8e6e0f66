"""MATH (Hendrycks et al. 2021) as released: `problem`, `solution`, `level`, `type`; gold = the last
`\\boxed{...}` of the solution (nested braces matched). MATH-500-style rows (`problem`, `solution`,
`answer`, `subject`, `level`, `unique_id`) keep their own `answer` and use `unique_id` as id.

STANDARD_SHOTS: the 4-shot prompt of Minerva (Lewkowycz et al. 2022, Appendix D.2), as lm-evaluation-harness's
minerva_math task gives it (typos included: it is the prompt the published numbers used).
"""
from __future__ import annotations

from ..verification import last_boxed
from .common import BadField, some_id, text

SHOT_FORMAT = "Problem:\n{question}\n\nSolution:\n{answer}"

STANDARD_SHOTS = [
    (r"Find the domain of the expression  $\frac{\sqrt{x-2}}{\sqrt{5-x}}$.}",
     r"The expressions inside each square root must be non-negative. Therefore, $x-2 \ge 0$, so $x\ge2$, and $5 - x "
     r"\ge 0$, so $x \le 5$. Also, the denominator cannot be equal to zero, so $5-x>0$, which gives $x<5$. "
     r"Therefore, the domain of the expression is $\boxed{[2,5)}$."
     "\nFinal Answer: The final answer is $[2,5)$. I hope it is correct."),
    (r"If $\det \mathbf{A} = 2$ and $\det \mathbf{B} = 12,$ then find $\det (\mathbf{A} \mathbf{B}).$",
     r"We have that $\det (\mathbf{A} \mathbf{B}) = (\det \mathbf{A})(\det \mathbf{B}) = (2)(12) = \boxed{24}.$"
     "\nFinal Answer: The final answer is $24$. I hope it is correct."),
    ("Terrell usually lifts two 20-pound weights 12 times. If he uses two 15-pound weights instead, how many times "
     "must Terrell lift them in order to lift the same total weight?",
     r"If Terrell lifts two 20-pound weights 12 times, he lifts a total of $2\cdot 12\cdot20=480$ pounds of weight.  "
     r"If he lifts two 15-pound weights instead for $n$ times, he will lift a total of $2\cdot15\cdot n=30n$ pounds "
     r"of weight.  Equating this to 480 pounds, we can solve for $n$:"
     "\n" r"\begin{align*}" "\n" r"30n&=480\\" "\n" r"\Rightarrow\qquad n&=480/30=\boxed{16}" "\n" r"\end{align*}"
     "\nFinal Answer: The final answer is $16$. I hope it is correct."),
    ("If the system of equations\n\n" r"\begin{align*}" "\n" r"6x-4y&=a,\\" "\n6y-9x &=b.\n" r"\end{align*}"
     "has a solution $(x, y)$ where $x$ and $y$ are both nonzero,\n" r"find $\frac{a}{b},$ assuming $b$ is nonzero.",
     r"If we multiply the first equation by $-\frac{3}{2}$, we obtain" "\n\n" r"$$6y-9x=-\frac{3}{2}a.$$Since we "
     r"also know that $6y-9x=b$, we have" "\n\n" r"$$-\frac{3}{2}a=b\Rightarrow\frac{a}{b}=\boxed{-\frac{2}{3}}.$$"
     "\nFinal Answer: The final answer is $-\\frac{2}{3}$. I hope it is correct."),
]


def adapt(row: dict) -> dict:
    problem = text(row, "problem")
    solution = row.get("solution") if isinstance(row.get("solution"), str) else None
    answer = row.get("answer")
    if answer is None or str(answer).strip() == "":
        if not solution:
            raise BadField("solution", "missing or empty (and no 'answer')")
        answer = last_boxed(solution, join_or=False)  # "A or B": one answer two ways, B as MATH-500 has it
        if answer is None:
            raise BadField("solution", "no \\boxed{...} final answer")
    extra = {k: row[k] for k in ("level", "type", "subject") if row.get(k) is not None}
    # ("question" too: one prompt.template, {question}, reads a GSM8K transfer split beside MATH, as exemplars do)
    return {**some_id(row, "unique_id", "id"), "prompt": problem, "problem": problem, "question": problem,
            "answer": str(answer),
            **({"solution": solution} if solution else {}), **extra}
