"""Grading: a binary reward and a verdict per sample. Plain classes; `pool.py` hosts them in Ray actors.

A failed grade is data (a verdict), never an exception: one bad row must not stop an E-step.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import logging
import math
import pickle
import re
import signal
import sys
import threading
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

from .errors import UserError
from .selection import unfinished

# A number as written in an answer: thousands separated by commas only in groups of three ("1,3" is a list, not
# 13), an optional decimal part, a fraction bar; Unicode's minus sign; ".5".
_NUM_RE = r"[-\u2212]?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:/\d+)?|[-\u2212]?\.\d+"
_NUM = re.compile(_NUM_RE)
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_GROUP_GAP = re.compile(r"\\,|\\!|\\ |\{,\}|~| ")
_SPACED_THOUSANDS = re.compile(r"-?\d{1,3}(?:(?:,?(?:\\[,! ]|\{,\}|~| ))+\d{3})+(?:\.\d+)?")
_MIXED = re.compile(r"(-?)(\d+)\s+(\d+)\s*/\s*(\d+)")  # "3 1/2", a mixed number as plain text writes it
# Where an answer phrase or the last number is read: also "18 000" (SI's groups of three, as `as_number` reads them)
# and "1 1/2" (a mixed number), taken whole; their last group alone ("000", "1/2") passed for the gold 0 and 1/2
_WIDE_NUM_RE = (r"[-\u2212]?\d{1,3}(?:[ \u2009\u202f]\d{3})+(?![\d/]|[ \t]*\d+[ \t]*/)(?:\.\d+)?"
                r"|[-\u2212]?\d+[ \t]+\d+[ \t]*/[ \t]*\d+|" + _NUM_RE)
_WIDE_NUM = re.compile(_WIDE_NUM_RE)
# `#### <answer>` (GSM8K's format) on its own line
_HASHES = re.compile(r"####[ \t]*([^\n]*)")
# "The answer is 18." (lm-eval's strict GSM8K match): a number that ends there ("18, which is", "18 (5 more"), not
# one that starts an expression ("3 - 4i", "2\sqrt{2}", "1,3"); or Minerva's "The final answer is $X$": the whole
# math, unless it is prose between two currency dollars ("is $18.00, since 2 items cost $9").
# Also "Answer: 18" and "**Answer:** 18" (chat models' labels, often with an explanation after), the number in
# bold or \(...\), and unit words before the sentence ends ("18 dollars per day."), but not words that make it
# part of an expression ("3 more than").
_LABEL = r"answer(?:\*\*)?(?:\s+is\b\s*:?|\s*:)(?:\*\*)?\s*"
# (a verb after the number makes it a clause, not a unit: "9 eggs are left, and she earns $18")
_UNIT_WORD = r"(?!(?:is|are|was|were|be|been|left|remains?|remaining)\b)[A-Za-z]+"
_UNITS = (r"(?:[ \t]+(?!(?:more|less|fewer|times|than|plus|minus|divided|multiplied|over|of|and|or|squared|cubed|"
          r"dozens?|hundreds?|thousands?|millions?|billions?|each|per)\b)" + _UNIT_WORD
          + r"(?:[ \t]+" + _UNIT_WORD + r"){0,2})?")
# "18 each." and "$18 per day, i.e. ..." are the answer, not "$18 each, or $36 total"
_RATE = (r"[ \t]+(?:each|per)\b(?:[ \t]+" + _UNIT_WORD + r"){0,2}"
         r"(?=\$?(?:[.;!?](?:\s|$)|[ \t]*(?:\n|$)|,(?![^.\n]*\btotal\b)))")
# ("The answer is 20 since she sells 10 eggs", "is 18: she ...", "is 12 as she has 4 boxes": the clause after it
# explains it, and its numbers are not the answer)
# (not a hyphen or an en dash: "10 - 2 = 8" and "3 - 4i" go on as math)
_CLAUSE = (r"[ \t]*[:\u2014][ \t]|[ \t]+(?:because|since|as|after|given|so|for|which|when|where|"
           r"if|but|from|with)\b")
_ANSWER_IS = re.compile(_LABEL + r"(?:\\\(|-?\\?\$|\*\*)?\s*(" + _WIDE_NUM_RE + r")(?:\*\*|\s*\\\))?(?:" + _RATE + "|"
                        + _UNITS + r"(?=\$?(?:[.;!?,](?:\s|$)|\s*\(|[ \t]*(?:\n|$))|" + _CLAUSE + "))",
                        re.IGNORECASE)
# (the math may hold `\$`; it does not end on a space nor at a currency sign: "is $10 + $8 = $18")
# "The answer is 4 or 6." (or "either 4 or 6", "12 and 5 apples."): the number phrase stops before "or" and "and",
# and the last number, 6, was graded
_ANSWER_HEDGE = re.compile(_LABEL + r"(?:either\s+)?\$?(" + _NUM_RE + r")((?:\s+(?:or|and)\s+\$?(?:" + _NUM_RE
                           + r"))+)(?:[ \t]+[A-Za-z]+)?(?=\$?\s*(?:[.;!?](?:\s|$)|\n|$))", re.IGNORECASE)
_ANSWER_IS_MATH = re.compile(_LABEL + r"\$((?:\\.|[^$\\\n])+)(?<!\s)\$(?!\d)", re.IGNORECASE)
# "The answer is \frac{1}{3}." or "is 3\sqrt{2}.": LaTeX written without $...$, up to the sentence's end
_ANSWER_IS_LATEX = re.compile(_LABEL + r"(?:\\\(\s*)?((?:-\s*)?(?:\d+(?:\.\d+)?\s*)?\\[A-Za-z]+[^\n$]*?)(?<!\s)(?:\s*\\\))?"
                              r"(?=\s*(?:[.;!?](?:\s|$)|\n|$))", re.IGNORECASE)
_PROSE = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}\s+[A-Za-z]{2,}")
_TEXT_IN_MATH = re.compile(r"\\(?:text\w*|mbox|mathrm|operatorname)\s*\{[^{}]*\}")  # units: "\text{ square units}"
_ANSWER_PREFIX = re.compile(r"^(?:the\s+)?(?:final\s+)?answer\b\s*(?:is\b|:|[-\u2013\u2014=](?=\s))?\s*:?\s*",
                            re.IGNORECASE)  # ("Answer - 18"; "Answer: -18" keeps its sign)
_NUMBER_THEN_WORDS = re.compile(r"\\?\$?\s*(" + _NUM_RE + r")\s+(?:[A-Za-z][A-Za-z\s.]*|\(.*\)\s*\.?)")
# \boxed{...} / \fbox{...}, or MATH's `$\boxed 5$`: one token, then the end of the math (not "in \boxed as asked")
_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{|\\boxed +([^\s${}\\]+|\\[A-Za-z]+)(?=\s*(?:\$|\\\]|\\\)))"
                  r"|\\boxed +(-?\d[\d.,/]*)\s*$")


@dataclass(frozen=True)
class Grade:
    reward: float  # 0.0 or 1.0
    verdict: str   # passed, wrong_answer, no_answer, restates_problem, verifier_error, ...


def _last_boxed_at(text: str) -> tuple[int, str | None]:
    """Where the last non-empty `\\boxed{...}` (or `\\fbox{...}`, or `\\boxed 5`) starts and its content, braces
    matched; (-1, None) if there is none, (start, None) if it is unbalanced. An empty box ("I put the answer in
    \\boxed{} as asked") is no answer and hides none before it."""
    for m in reversed(list(_BOX.finditer(text))):
        if m.group(1) is not None or m.group(2) is not None:  # `\boxed 5$`
            return m.start(), m.group(1) or m.group(2)
        start = m.end()
        close = _closing_brace(text, start)
        if close is None:
            return m.start(), None  # unbalanced
        if text[start:close].strip():
            return m.start(), text[start:close].strip()
    return -1, None


def _closing_brace(text: str, start: int) -> int | None:
    """Where the group opened just before `start` closes: `\\{` and `\\}` (a set's braces, `\\left\\{` of a
    piecewise answer) are characters, not braces, and `\\\\{` is a line break then a brace. None if it never does."""
    depth, i = 1, start
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


# Between two boxes of one answer: "$\\boxed{2}$ and $\\boxed{3}$", "\\boxed{2}, \\boxed{3}", "x=\\boxed{2} or x=\\boxed{3}"
_BOX_JOIN = re.compile(r"[\s$,]*(?:\\text\{\s*)?(?:(?:and|or)\b)?(?:\s*\})?[\s$,]*(?:\\[(\[]\s*)?(?:[A-Za-z]\s*=\s*)?")


_APPROX_JOIN = re.compile(r"[\s$]*(?:\\approx|\\sim|\u2248)[\s$]*(?:\\[(\[]\s*)?")


def _final_boxed_at(text: str, join_or: bool = True) -> tuple[int, str | None]:
    """The last box, and with it the boxes just before it joined to it by "and", "or" or a comma (several
    solutions, boxed one by one; across lines only by those words): their contents joined by ", " ("2, 3").
    `join_or` False: boxes "or" joins are one answer written two ways ("$\\boxed{15\\frac{39}{40}}$ or
    $\\boxed{\\frac{639}{40}}$" in a MATH solution): the last is taken alone."""
    at, last = _last_boxed_at(text)
    if last is not None:  # "$\\boxed{2\\sqrt{3}} \\approx \\boxed{3.46}$": one answer, exact and rounded
        prev_at, prev = _last_boxed_at(text[:at])
        end = _box_end(text, prev_at) if prev is not None else None
        if end is not None and _APPROX_JOIN.fullmatch(text[end:at]):
            at, last = prev_at, f"{prev} \\approx {last}"
    parts = [last]
    while last is not None:
        head = text[:at]
        prev_at, prev = _last_boxed_at(head)
        if prev is None:
            break
        end = _box_end(head, prev_at)
        between = head[end:] if end is not None else ""
        if end is None or not _BOX_JOIN.fullmatch(between) or (
                "\n" in between and not re.search(r"\b(?:and|or)\b|,", between)) or (  # (lines apart: joined in words)
                not join_or and re.search(r"\bor\b", between)):
            break
        at, parts = prev_at, [prev, *parts]
    return at, (", ".join(parts) if last is not None else None)


def _box_end(text: str, at: int) -> int | None:
    """Where the box starting at `at` ends (after its closing brace or its one token)."""
    m = _BOX.match(text, at)
    if m is None:
        return None
    if m.group(1) is not None or m.group(2) is not None:
        return m.end()
    close = _closing_brace(text, m.end())
    return None if close is None else close + 1


def last_boxed(text: str, join_or: bool = True) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`, or `\\boxed 5`), braces matched, with the boxes
    "and", "or" (unless `join_or` is False) or a comma join to it ("$\\boxed{2}$ and $\\boxed{3}$" is "2, 3");
    None if none."""
    return _final_boxed_at(text, join_or)[1]


# What a `####` answer starts with: a number or math ("x = 5", "x+1", "sqrt(2)", "i"), a choice letter.
_MATHY = re.compile(r"[-\u2212+$\\(\[{.\d\u221a\u03c0\u221e]|[A-Za-z]\s*[-=^_+*/]|[A-Za-z]+\(|[A-Za-z]$|\(?[A-E]\)?$")
_LABELLED = re.compile(r"[A-Za-z][A-Za-z \t]*:\s*(.+)")  # "Total: 18", "Result: $18"
# A markdown heading, wherever it stands: "Step 2: Earnings", a title ending in a colon, a usual title word
_TITLE = re.compile(r"step\b.*|.*:|(?:final\s+)?(?:solution|verification|explanation|summary|conclusion|"
                    r"calculations?|check|double-check|reasoning|approach|analysis|answer|work|setup|problem|"
                    r"breakdown|computation|result|results|note|remark)", re.IGNORECASE)
# Before the completion's last line a line is a heading unless it is a sentence ("Janet makes $18 a day."), and
# a numbered one ("2. Earnings") is a heading too
_SENTENCE = re.compile(r".*[A-Za-z]{3}.*[.!]\s*")
_NUMBERED = re.compile(r"\d{1,2}[.)]\s+[A-Za-z][^=]*")
_MATH_SPANS = re.compile(r"\$[^$]*\$")


def _hash_answer(line: str, last: bool) -> str | None:
    """The answer on a `####` line: "Final Answer: 42" is 42, "72 clips" is 72, "**18**" is 18, "Total: 18" is
    18, "x+1" is x+1; a markdown heading ("Step 2: Earnings", "Verification", and before the last line anything
    but a sentence: "Eggs left", "Case 2: $x < 0$", "2. Earnings") holds none. On the last line words are an
    answer ("New York", "yes"), and a sentence gives its number ("The total is 18")."""
    line = line.strip().replace("**", "").strip()
    unlabelled = _ANSWER_PREFIX.sub("", line).strip()
    said = unlabelled != line  # "Final Answer: ...": an answer follows, whatever it looks like
    line = unlabelled
    labelled = _LABELLED.fullmatch(line)
    if labelled and _MATHY.match(labelled.group(1)):
        line, said = labelled.group(1).strip(), True
    if not line or (not said and not last and _NUMBERED.fullmatch(line)):
        return None
    if _MATHY.match(line):
        m = _NUMBER_THEN_WORDS.fullmatch(line)
        if m:
            return m.group(1)
        nums = _NUM.findall(line)
        if nums and last and "\\" not in line and _PROSE.search(_MATH_SPANS.sub("", line)):
            # a sentence or a numbered heading on the last line ("3. Total earnings: $18", "9 eggs are left, and
            # she earns $18"): its last number, as a sentence's below
            return nums[-1]
        return line
    if not said and (_TITLE.fullmatch(line) or (not last and not _SENTENCE.fullmatch(_MATH_SPANS.sub("", line)))):
        return None
    nums = _NUM.findall(line) if _PROSE.search(line) else []  # a sentence's number; else the line ("n(n+1)/2")
    return nums[-1] if nums else line


_FINAL = "<|channel|>final<|message|>"
_MESSAGE_END = re.compile(r"<\|(?:end|return|call|start)\|>")


# ", 5", " or $x = 3$", " and 4" after an answer phrase's value, up to the sentence's end: more values of one answer
# ("The answer is 2, 3." for "enter all solutions") or a hedge ("$3$ or $5$"), never only its first value
_MORE = re.compile(r"\s*(,\s*(?:(?:or|and)\b\s*)?|(?:or|and)\b\s*)(?:\$((?:\\.|[^$\\\n])+)\$|(" + _NUM_RE + r"))"
                   r"(?=\s*(?:[.;!?](?:\s|$)|\n|$|,|(?:or|and)\b))")


def _more_values(text: str, end: int, first: str) -> str:
    """The values `_MORE` finds after an answer phrase's value `first`, ending at `end`, as ", a, b" (or ""): a
    list ("2, 3", "1, 2, or 3", "-1 and 4") or a hedge ("3 or 5", "2, or -2"), but not the same answer again in
    another form after a lone ", or" or ", and" ("$\\frac14$, or $25\\%$", "$3$, and $b = 3$")."""
    more = []
    while (m := _MORE.match(text, end)) and len(more) < 20:
        value = (m.group(2) or m.group(3)).strip()
        if not more and m.group(1).startswith(",") and m.group(1).strip(", ") and _restates(first, value):
            break
        more.append(value)
        end = m.end()
    return "".join(", " + v for v in more)


def _restates(first: str, value: str) -> bool:
    """Whether `value` is `first` written another way (grading's own equivalence; an error is no)."""
    try:
        return answers_match(first, value)
    except Exception:
        return False


def _signed(text: str, m: re.Match) -> str:
    """An answer phrase's number with a minus written before its currency sign ("is -$10.": -10)."""
    number = m.group(1)
    if re.search(r"-\s*\\?\$\s*$", text[m.start():m.start(1)]) and not number.startswith(("-", "\u2212")):
        return "-" + number
    return number


def after_thinking(completion: str, prompt: str = "") -> str:
    """What a reasoning model (DeepSeek-R1 and its distills, Qwen3, QwQ) answers after its trace: the text after
    the last </think>, since the trace's tentative answers ("so the answer is 20. Wait, ...") are not the final
    one; a trace never closed (max_tokens cut it) holds no answer yet. A trace is one the prompt opens at its end
    (R1's distills' templates end with <think>), one the completion starts with, or a </think> with no <think>
    before any code fence. Other completions as they are (a program may handle a literal "<think>" tag).
    A harmony completion (gpt-oss, its special tokens kept: sampling.skip_special_tokens) answers in its last
    final channel's message; one that never opened it (cut in its analysis) holds no answer yet."""
    if completion.lstrip().startswith("<|channel|>"):
        at = completion.rfind(_FINAL)
        return "" if at < 0 else _MESSAGE_END.split(completion[at + len(_FINAL):], 1)[0]
    close = completion.find("</think>")
    if (prompt.rstrip().endswith("<think>") or completion.lstrip().startswith("<think>")
            or (close >= 0 and "<think>" not in completion and "```" not in completion[:close])):
        end = completion.rfind("</think>")
        return completion[end + len("</think>"):] if end >= 0 else ""
    return completion


def seen_prompt(problem: dict) -> str:
    """The prompt the model was given: a graded samples file's own (`restem-ray verify` keeps it as
    sampled_prompt, the problem file holding the raw question), else the problem's (rendered) prompt."""
    for key in ("sampled_prompt", "prompt"):
        if isinstance(problem.get(key), str):
            return problem[key]
    return ""


def extract_answer(completion: str, prompt: str = "", finished: bool = True) -> str | None:
    """The final answer (after a reasoning model's </think>): whichever of the last `####` answer and the last
    \\boxed{} (with the boxes joined to it) comes later (a markdown `####` heading is no answer, `_hash_answer`);
    without a box, a later "the answer is N." or "the final answer is $X$" (lm-eval's GSM8K and Minerva matches,
    also as an "Answer:" label; with the values listed after it: "is $3$ or $5$." is "3, 5") competes with the
    `####` answer; else the last number, unless the completion did not finish (`finished` False:
    cut at max_tokens mid-solution, "9*2=18. Then we subtract the feed, which is", its last number is no answer)."""
    completion = after_thinking(completion, prompt)
    found: list[tuple[int, str]] = []
    hashes = [(m.start(), a) for m in _HASHES.finditer(completion)
              if (a := _hash_answer(m.group(1), last=not completion[m.end():].strip()))]
    if hashes:
        found.append(hashes[-1])
    at, boxed = _final_boxed_at(completion)
    if boxed is not None:
        found.append((at, boxed))
    else:
        # (where both read one phrase, "is $3, 5$", the whole math wins over its first number; a box wins over any
        # phrase: what follows a box is as often a check, "if the answer is 10, then ...", or a rounding as a
        # correction)
        phrases = [(m.start(), 0, _signed(completion, m), m.end()) for m in _ANSWER_IS.finditer(completion)]
        phrases += [(m.start(), 0, ", ".join([m.group(1), *_NUM.findall(m.group(2))]), m.end())
                    for m in _ANSWER_HEDGE.finditer(completion)]
        phrases += [(m.start(), 1, m.group(1), m.end()) for pattern in (_ANSWER_IS_MATH, _ANSWER_IS_LATEX)
                    for m in pattern.finditer(completion)
                    if m.group(1).strip() and not _PROSE.search(_TEXT_IN_MATH.sub("", m.group(1)))]
        if phrases:
            at, _, answer, end = max(phrases)
            found.append((at, answer + _more_values(completion, end, answer)))
    if found:
        return max(found)[1].strip()
    if not finished:
        return None
    # No answer marker: a last line that computes ("... = 6 miles on the 13th day") gives its result, not the
    # numbers it goes on to restate; else the last number. Where that number is written in a LaTeX value
    # ("$\\frac{1}{2}$", "3\\sqrt{2}"), the value is the answer, not its denominator or its root's argument alone.
    lines = [line for line in completion.splitlines() if line.strip()]
    if lines and "=" in lines[-1]:
        rhs = lines[-1].rsplit("=", 1)[1]
        result = _NUM.search(rhs)
        if result:
            return _in_latex_value(rhs, result)
    nums = list(_WIDE_NUM.finditer(completion))
    return _in_latex_value(completion, nums[-1]) if nums else None


def _in_latex_value(text: str, number: re.Match) -> str:
    """The LaTeX value `number` is written in, or the number alone. (Values are looked for near the number only: a
    long completion's unclosed braces would each be followed to its end.)"""
    at = max(0, number.start() - _TEX_REACH)
    near = text[at:number.end() + _TEX_REACH]
    for start, end, value in _latex_values(near):
        if start + at <= number.start() and number.end() <= end + at:
            return value
    return number.group(0)


# LaTeX values that written numbers are only a part of: fractions, roots, multiples of pi ("-\frac{3}{4}", "3\sqrt{2}",
# "\frac{\sqrt{3}}{2}", "2\pi"); a value may chain them ("\frac{1}{2}\sqrt{3}")
_TEX_VALUE = re.compile(r"\\(?:[dt]?frac|sqrt|pi)(?![A-Za-z])")
# a sign and a coefficient before it ("-3\\sqrt{2}", "1,000\\pi"), not an exponent's or an index's digits (x^2\\sqrt{3})
_TEX_LEAD = re.compile(r"(?:[-\u2212][ \t]*)?(?:(?<![\d^_,.])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?[ \t]*)?$")
# a minus after an operand is a difference's ("10 - \\frac12", "x-\\sqrt2"), not a sign ("the slope is -\\frac34")
_OPERAND_BEFORE = re.compile(r"(?:[\d)}\]]|(?<![A-Za-z\\])[A-Za-z])[ \t]*$")
_TEX_REACH = 400  # characters around the last number where its value may start or end


def _tex_atom_end(text: str, i: int) -> int | None:
    """Where the fraction, root or pi starting at `i` ends; None if its arguments are not there."""
    m = _TEX_VALUE.match(text, i)
    if m is None:
        return None
    name, j = m.group(0), m.end()
    if name == "\\pi":
        return j
    for _ in range(2 if name.endswith("frac") else 1):
        while j < len(text) and text[j] in " \t":
            j += 1
        if name == "\\sqrt" and text.startswith("[", j):  # an n-th root's index
            close = text.find("]", j)
            if close < 0:
                return None
            j = close + 1
        if text.startswith("{", j):
            close = _closing_brace(text, j + 1)
            if close is None or close == j + 1:
                return None
            j = close + 1
        elif j < len(text) and text[j].isalnum():  # "\frac12", "\sqrt2"
            j += 1
        else:
            return None
    return j


def _latex_values(text: str) -> list[tuple[int, int, str]]:
    """Each LaTeX value (start, end, text) in `text`, in order, with its sign and its coefficient."""
    values: list[tuple[int, int, str]] = []
    for m in _TEX_VALUE.finditer(text):
        if values and m.start() < values[-1][1]:  # inside the value before (a root in a fraction)
            continue
        end = _tex_atom_end(text, m.start())
        if end is None:
            continue
        while (nxt := _tex_atom_end(text, end)) is not None:  # adjacent: a product ("\frac{1}{2}\sqrt{3}")
            end = nxt
        lead = _TEX_LEAD.search(text[max(0, m.start() - 40):m.start()]).group(0)  # (a coefficient is short)
        start = m.start() - len(lead)
        if lead[:1] in "-\u2212" and lead and _OPERAND_BEFORE.search(text[max(0, start - 8):start]):
            start += len(lead) - len(lead[1:].lstrip())
        values.append((start, end, text[start:end].strip().replace("\u2212", "-")))
    return values


def as_number(text: str) -> Fraction | None:
    """The answer's exact value when it is a plain number ("1,000", "$18.90", "\\$18.90", "18.", "3/4", "−5"):
    a Fraction, so 1000000007 and 1000000008 (or two 20-digit integers) are not one number as floats made them."""
    t = text.strip().replace("\\$", "").replace("$", "").replace("\u2212", "-").rstrip(".").strip()
    if _SPACED_THOUSANDS.fullmatch(t):  # "18\,000", "18 000", "10,\!000": LaTeX's and SI's groups of three
        t = _GROUP_GAP.sub("", t)
    if _THOUSANDS.fullmatch(t):
        t = t.replace(",", "")
    if "_" in t:  # (a subscript, 52_8 a base-8 numeral: Python's float() reads it as 528)
        return None
    try:
        parts = [float(x) for x in t.split("/", 1)]  # what Python reads as a number at all, and its size
        if not all(map(math.isfinite, parts)):
            return None
        if any(abs(int(e)) > 4000 for e in re.findall(r"[eE]([+-]?\d+)", t)):
            exact = [Fraction(x) for x in parts]  # (1e-999999 as a Fraction is a million-digit integer)
        else:
            exact = [Fraction(x.strip()) for x in t.split("/", 1)]
        value = exact[0] / exact[1] if len(exact) == 2 else exact[0]
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    return value if abs(value) <= _LARGEST else None  # ("1e300/1e-300": no float holds it, as none holds 1e999)


_LARGEST = Fraction(sys.float_info.max)


def _same_number(a: Fraction, b: Fraction) -> bool:
    """Exact, unless one side is a fraction no decimal writes out (1/3, 2/7): then a decimal of it matches to 1e-9
    relative ("0.3333333333" for 1/3)."""
    if a == b:
        return True
    if _terminates(a) == _terminates(b) or 1 in (a.denominator, b.denominator):  # (no such fraction is an integer)
        return False
    return math.isclose(a, b, rel_tol=1e-9)


def _terminates(x: Fraction) -> bool:
    d = x.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    return d == 1


def _wrap(answer: str) -> str:
    """math-verify parses bare LaTeX (`2\\sqrt{2}`, `\\dfrac{3}{4}`, `(1,2)`) reliably only inside $...$."""
    return answer if re.search(r"(?<!\\)\$", answer) or "\\boxed" in answer else f"${answer}$"


# A repeating decimal, 0.\overline{36} or 1.2\overline{3}: math-verify reads only its integer part (0, 1)
_REPEATING = re.compile(r"(?<![\d.])(-?)(\d*)\.(\d*)\\overline\s*(?:\{(\d+)\}|(\d))")


def _repeating_as_fraction(text: str) -> str:
    def exact(m: re.Match) -> str:
        sign, whole, fixed, rep = m.group(1), m.group(2) or "0", m.group(3), m.group(4) or m.group(5)
        if len(whole) + len(fixed) + len(rep) > 400:  # (no answer; Python refuses such int conversions)
            return m.group(0)
        value = int(whole) + Fraction(int(fixed + rep) - int(fixed or "0"), 10 ** len(fixed) * (10 ** len(rep) - 1))
        value = -value if sign else value
        if value.denominator == 1:
            return str(value.numerator)
        # (inside an expression, 0.\overline{3}x is (1/3)x, not 1/(3x))
        whole = m.group(0) == text.strip()
        return f"{value.numerator}/{value.denominator}" if whole else f"({value.numerator}/{value.denominator})"

    return _REPEATING.sub(exact, text)


# 52_8, 1011_{2}, 2A_{(16)}, 1011_\text{2}
_BASE = re.compile(r"\s*([0-9A-Za-z]+)_(?:\{\s*)?(?:\\(?:text|mathrm)\s*\{\s*)?\(?(\d+)\)?(?:\s*\})*\s*")


def _in_base(answer: str) -> tuple[str, int] | None:
    """A numeral with its base subscript: (digits, base), for bases 2-36 whose digits it uses (x_1 is none)."""
    m = _BASE.fullmatch(answer)
    if not m or not 2 <= int(m.group(2)) <= 36:
        return None
    try:
        int(m.group(1), int(m.group(2)))
    except ValueError:
        return None
    return m.group(1), int(m.group(2))


# \boxed{\text{18 dollars}}: the whole answer written as text, a number and its unit (math-verify reads no number)
_NUMBER_IN_TEXT = re.compile(r"\s*\\(?:text(?:bf|rm)?|mbox|mathrm)\s*\{\s*((?:" + _NUM_RE + r"))\s+"
                             r"(?!(?:dozens?|hundreds?|thousands?|millions?|billions?|trillions?)\b)"
                             r"[A-Za-z][A-Za-z\s.]*\}\s*", re.IGNORECASE)  # (not "1 million": 1,000,000)


def _mixed_as_fraction(answer: str) -> str:
    """"3 1/2" as "7/2": a mixed number as plain text writes it, which math-verify reads as 1 (LaTeX's
    3\frac{1}{2} it reads right). An improper "3 5/2" is left as written."""
    m = _MIXED.fullmatch(answer.strip())
    if not m or int(m.group(3)) >= int(m.group(4)) or len(answer) > 60:
        return answer
    sign, whole, num, den = m.groups()
    return f"{sign}{int(whole) * int(den) + int(num)}/{den}"


# MATH's "Enter the letters of the correct options, separated by commas": \text{A, C}, A, C or (A), (C)
_TEXT_WRAP = re.compile(r"\\(?:text(?:bf|rm)?|mathrm|mbox)\s*\{([^{}]*)\}")
_LETTER_LIST = re.compile(r"\(?[A-Z]\)?(?:\s*,\s*\(?[A-Z]\)?)+")


def _letter_choices(answer: str) -> list[str] | None:
    """The letters of a list of options, in order of the alphabet; None for anything else (one letter included:
    math-verify reads that)."""
    text = _TEXT_WRAP.sub(r"\1", answer).replace("$", "").strip()
    return sorted(set(re.findall(r"[A-Z]", text))) if _LETTER_LIST.fullmatch(text) else None


def _number_in_text(answer: str) -> str:
    m = _NUMBER_IN_TEXT.fullmatch(answer)
    return m.group(1) if m else answer


_END_MARK = re.compile(r"(?<![.\\\s])\s*[.,]\s*$")  # (not "\ldots", "...", nor a decimal: "5." is 5 anyway)
# An option with its value, as AMC problems in MATH write it: "\textbf{(C)}\ 12", "(C) 12", "\text{(C) } 12"
_CHOICE_VALUE = re.compile(r"\s*(\\text(?:bf|rm)?\s*\{\s*)?\(([A-E])\)(?:\s*\})?((?:\\[ ,;:!]|~|\s)*)(.*?)\s*")
_PM = re.compile(r"\\pm(?![A-Za-z])|\u00b1")
_APPROX = re.compile(r"\\approx(?![A-Za-z])|\u2248")


def _choice_and_value(answer: str) -> tuple[str, str] | None:
    """(letter, value) of an AMC option written with its letter in parentheses ("\\text{(C)}" has the value "");
    None for anything else ("(A)x" is a product, "(2)" a number)."""
    m = _CHOICE_VALUE.fullmatch(answer)
    if not m or (m.group(4) and not (m.group(1) or m.group(3))):  # (a value needs a space or the \text before)
        return None
    if re.search(r"\([A-E]\)|^[,;]|\bor\b", m.group(4)):  # ("\text{(E)}, \text{(D)}": two options, a hedge)
        return None
    return m.group(2), m.group(4)


def _letter(answer: str) -> str | None:
    """The option an answer names on its own ("C", "(C)", "\\text{C}"), else None."""
    m = CHOICE.fullmatch(answer.strip())
    return m.group(1).upper() if m else None


def _rounds_to(exact: str, rounded: str) -> bool:
    """Whether `rounded` may be `exact` rounded: not where both are numbers and `exact`, to `rounded`'s decimals,
    is another number (`2\\sqrt{2} \\approx 3.5`); an exact side with a variable ("x \\approx 3.46") or a unit
    contradicts nothing."""
    numbers = [_parse(x) for x in (exact, rounded)]
    if not all(n and getattr(n[0], "is_number", False) for n in numbers):
        return True
    try:
        x, r = (float(n[0].evalf()) for n in numbers)
    except (TypeError, ValueError, OverflowError):
        return True
    digits = re.search(r"\d\.(\d+)", rounded)
    return abs(x - r) <= 0.5 * 10 ** -(len(digits.group(1)) if digits else 0) + 1e-12


def _expands_against(answer: str, other: str) -> bool:
    """Whether `answer`'s one ± is read as its two values: where the other side has one too, or lists values as
    they are (not an ordered pair, an interval or a set membership, which math-verify compares loosely with two
    values: "(2,-2)" passed for "\\pm 2")."""
    if len(_PM.findall(answer)) != 1:
        return False
    if _PM.search(other):
        return True
    other = other.strip()
    return "," in other and not re.match(r"\\left|[(\[{]", other) and not re.search(r"\\in\b|[<>]|\\[lg]eq?\b", other)


def _plus_minus_expanded(answer: str) -> str:
    """An answer with one ± as its two values: "\\frac{1 \\pm \\sqrt{5}}{2}" is "\\frac{1 + \\sqrt{5}}{2},
    \\frac{1 - \\sqrt{5}}{2}" (math-verify reads a ± only outside a fraction); a list, or several ±, as written."""
    if len(_PM.findall(answer)) != 1 or "," in answer:
        return answer
    return f"{_PM.sub('+', answer)}, {_PM.sub('-', answer)}"


def answers_match(gold: str, pred: str) -> bool:
    """Numeric comparison when both are numbers (GSM8K); LaTeX equivalence through math-verify otherwise.

    math-verify's own timeouts use SIGALRM; they are turned off here and the caller bounds the time
    (`call_with_timeout`), which also works off the main thread.
    """
    # MATH writes money as `\boxed{\$18.90}`: an escaped dollar sign is not math (math-verify parses nothing)
    gold, pred = gold.replace("\\$", ""), pred.replace("\\$", "")
    gold, pred = gold.replace("\u2212", "-"), pred.replace("\u2212", "-")  # U+2212, the typeset minus sign
    gold, pred = _repeating_as_fraction(gold), _repeating_as_fraction(pred)
    gold, pred = _number_in_text(gold), _number_in_text(pred)
    gold, pred = _mixed_as_fraction(gold), _mixed_as_fraction(pred)
    g, p = as_number(gold), as_number(pred)
    if g is not None and p is not None:  # (GSM8K's every grade: before the rules below, which read no plain number)
        return _same_number(g, p)
    pred = _END_MARK.sub("", pred)  # ("\boxed{\frac{1}{2}.}": the sentence's period, inside the box)
    approx = [x.strip() for x in _APPROX.split(pred)]
    if len(approx) == 2 and all(approx) and not re.search(r",(?!\d{3}(?!\d))", pred):  # (a list; not 3,142)  # "2\sqrt{3} \approx 3.46": the exact value, or for
        exact, rounded = approx  # "to the nearest tenth" the rounded one, where the exact value rounds to it
        return answers_match(gold, exact) or (answers_match(gold, rounded) and _rounds_to(exact, rounded))
    letters = _letter_choices(gold), _letter_choices(pred)
    if letters[0] and letters[1]:  # (math-verify read "\text{A, C}" and "A, C" as different)
        return letters[0] == letters[1]
    choices = _choice_and_value(gold), _choice_and_value(pred)
    if choices[0] or choices[1]:  # "\textbf{(C)}\ 12": an AMC option, its letter and its value
        (gl, gv), (pl, pv) = (c or (_letter(t), t) for c, t in zip(choices, (gold, pred)))
        if gl and pl:
            return gl == pl
        return bool(gv and pv) and answers_match(gv, pv)  # (a letter alone matches no value)
    if _expands_against(gold, pred) or _expands_against(pred, gold):
        gold, pred = _plus_minus_expanded(gold), _plus_minus_expanded(pred)
    based = _in_base(gold), _in_base(pred)
    if based[0] or based[1]:  # (math-verify drops a base subscript: 52_8 was 52_{10})
        base = (based[0] or based[1])[1]  # (a numeral without one is in the other side's base: "52" for 52_8)
        (gd, gb), (pd, pb) = (b or (t.strip(), base) for b, t in zip(based, (gold, pred)))
        same = gd.upper().lstrip("0") == pd.upper().lstrip("0") if gb > 10 else gd.lstrip("0") == pd.lstrip("0")
        return gb == pb and same
    g, p = as_number(gold), as_number(pred)
    if g is not None and p is not None:
        return _same_number(g, p)
    from math_verify import verify

    # math-verify drops a last letter it takes for a unit (h, s, t, m, ...): "\\pi r^2 h" was "\\pi r^2", so a
    # wrong answer without the h passed, and "\\pi h r^2" failed; "t^2+3t" was "t^2+3". Where neither side writes a
    # unit as text or a word, letters are variables.
    letters = _only_variables(gold) and _only_variables(pred)
    gold_p, pred_p = _parse(gold, letters), _parse(pred, letters)
    if letters and not (gold_p and pred_p):
        gold_p, pred_p = _parse(gold), _parse(pred)
    # (math-verify rounds numbers to 6 decimals by default: 1/2^20 was 0.000001, and 1/8 was 0.1250001; 9 keeps a
    # decimal of a fraction that no decimal writes out, 0.333333333 for 1/3, as the plain-number path does)
    return bool(gold_p and pred_p and verify(gold_p, pred_p, float_rounding=9, timeout_seconds=None))


_UNIT_TEXT = re.compile(r"\\(?:text\w*|mbox|mathrm|operatorname)\b")


def _only_variables(answer: str) -> bool:
    """Math whose letters are all single-letter variables outside LaTeX commands: no unit written as text or as
    a word ("5\\text{ cm}", "5 cm"), nor a number and a letter apart ("5 m", "3\\ s": a unit; "4s" is a term)."""
    return not _UNIT_TEXT.search(answer) and not _BARE_UNIT.fullmatch(answer) and not re.search(
        r"[A-Za-z]{2,}", re.sub(r"\\[A-Za-z]+", " ", answer))


_BARE_UNIT = re.compile(r"\s*-?\d[\d.,]*(?:\s+|\s*\\[ ,;!]\s*|~)[A-Za-z]\s*")


@functools.lru_cache(maxsize=4096)
def _parse(answer: str, letters_are_variables: bool = False):
    """math-verify's parse, cached: a problem's reference answer is parsed once for all its samples, and
    repeated predictions once (parsing is most of math-verify's cost, ~3 ms per call here).
    `letters_are_variables`: without math-verify's removal of units (a last "h" or "cm")."""
    from math_verify import parse

    if letters_are_variables:
        from math_verify import ExprExtractionConfig, LatexExtractionConfig
        from math_verify.parser import NormalizationConfig

        keep = NormalizationConfig(basic_latex=True, units=False, malformed_operators=True, nits=True, boxed="all",
                                   equations=False)
        config = [LatexExtractionConfig(normalization_config=keep), ExprExtractionConfig()]
        parsed = parse(_wrap(answer), extraction_config=config, parsing_timeout=None)
    else:
        parsed = parse(_wrap(answer), parsing_timeout=None)
    # math-verify reads i as a symbol whose assumptions depend on how it is written ("6+2i" and "2(3+i)" did not
    # cancel): in an answer it is the imaginary unit
    return [_imaginary_unit(x) for x in parsed]


def _imaginary_unit(expr):
    import sympy

    if not isinstance(expr, sympy.Basic) or isinstance(expr, (sympy.logic.boolalg.Boolean, sympy.Set)) or expr.has(
            sympy.core.relational.Relational):  # ("(i,j) = (1,2)", "i \in [1,3]": there i names a variable)
        return expr
    try:
        return expr.subs({s: sympy.I for s in expr.free_symbols if getattr(s, "name", None) == "i"})
    except Exception:  # (a structure sympy cannot substitute into: as read)
        return expr


# math-verify warns on every call without its own timeouts. Set once here, not inside the timed call: an alarm
# landing inside logging's cache clearing would leave logging's lock held.
logging.getLogger("math_verify").setLevel(logging.ERROR)


def warm_math() -> None:
    """math-verify's import and first parse: 0.3 s on an idle machine, over 5 s on a busy node. Done before any
    timed call: inside a sample's answer_timeout_s it once graded a right answer 'timeout' (and an alarm inside
    an import leaves the module half-initialised)."""
    answers_match("1", "\\frac{2}{2}")


def latex_key(text: str) -> str:
    """An expression as written, for finding it in a problem's text: spacing, $, \\left/\\right, \\dfrac and the
    braces a one-token argument may go without (\\sqrt3, \\frac12) aside."""
    text = re.sub(r"\\(?:left|right)\b|\$|\\[,!;: ]", "", text).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = "".join(text.split())
    text = _FRAC_ARGS.sub(lambda m: "\\frac" + _braced(m.group(1)) + _braced(m.group(2)), text)
    return _SQRT_ARG.sub(lambda m: "\\sqrt" + _braced(m.group(1)), text)


_ARG = r"(\{[^{}]*\}|\\[A-Za-z]+|[^\\{}])"
_FRAC_ARGS = re.compile(r"\\frac" + _ARG + _ARG)
_SQRT_ARG = re.compile(r"\\sqrt" + _ARG)


def _braced(arg: str) -> str:
    return arg if arg.startswith("{") else "{" + arg + "}"


def restates_the_problem(problem: dict, pred: str) -> bool:
    """Whether the answer is an expression the problem itself writes ("Compute $\\dbinom{31}{28}$." answered
    \\boxed{\\dbinom{31}{28}}): math-verify evaluates both sides, so it would pass without any work done, and the
    M-step would learn to box the question. Not a plain number, nor the gold answer as written."""
    statement = problem.get("raw_prompt") or problem.get("prompt")
    if not isinstance(statement, str) or as_number(pred) is not None:
        return False
    key = latex_key(pred)
    if (len(key) < 3 or not re.search(r"[\\^_/*+(]", key) or key == latex_key(str(problem.get("answer", "")))
            or CHOICE.fullmatch(key)):
        return False
    return key in _math_expressions(statement)


# a multiple-choice letter: "(C)", "\text{(C)}", "C"
CHOICE = re.compile(r"(?:\\text(?:bf)?\{\s*)?\(?([A-Ea-e])\)?(?:\s*\})?")
_MATH_SPAN = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.S)


def _math_expressions(statement: str) -> set[str]:
    """The problem's own expressions: each math span whole, and each side of an `=` in one ("Compute
    $\\dbinom{31}{28}$", "Let $f(x) = x^2+1$"), as keys."""
    out = set()
    for m in _MATH_SPAN.finditer(statement):
        span = next(g for g in m.groups() if g is not None)
        out.add(latex_key(span))
        out.update(latex_key(side) for side in span.split("="))
    out.discard("")
    return out


RESTATES = "restates_problem"  # the verdict of an answer that is the problem's own expression (reward 0)


def grade_math(problem: dict, completion: str) -> Grade:
    """A sample row's grade (`problem`: the problem's fields, and the sample's `finish_reason` where it has one)."""
    pred = extract_answer(completion, seen_prompt(problem), finished=not unfinished(problem.get("finish_reason")))
    if pred is None:
        return Grade(0.0, "no_answer")
    if restates_the_problem(problem, pred):
        return Grade(0.0, RESTATES)
    if _no_interval_where_asked(problem, pred):
        return Grade(0.0, "wrong_answer")
    return Grade(1.0, "passed") if answers_match(str(problem["answer"]), pred) else Grade(0.0, "wrong_answer")


_INTERVAL_ASKED = re.compile(r"interval\s+notation", re.IGNORECASE)
_INTERVAL_SIGNS = re.compile(r"[(\[]|\\cup|\\infty|\\emptyset|\\varnothing|\\mathbb|\u221e|\u2205")


def _no_interval_where_asked(problem: dict, pred: str) -> bool:
    """An answer with no interval at all to a problem that asks for interval notation, whose gold is one:
    math-verify matched the open interval "(-2,1)" with its end points "-2, 1" and "x=-2, x=1" (the roots of
    the boundary equation, not the solution set of the inequality)."""
    statement = problem.get("raw_prompt") or problem.get("prompt")
    gold = str(problem.get("answer", ""))
    return (isinstance(statement, str) and bool(_INTERVAL_ASKED.search(statement))
            and bool(re.match(r"\s*(?:\\left)?[(\[]", gold)) and not _INTERVAL_SIGNS.search(pred))


class CallTimeout(Exception):
    pass


_pool = None
_pool_lock = threading.Lock()  # one call at a time in the one helper process; resets must not race
_helper_error: tuple[tuple, BaseException] | None = None  # a helper that could not load these functions
_warmed: set[tuple] = set()  # the functions the current helper has loaded
# A new helper process starts Python, re-imports the parent's __main__ (in a Ray worker: Ray), then restem_ray,
# the plug-in's module and math-verify: seconds on a busy node, under its own limit rather than the first call's.
HELPER_START_S = 120.0


def _raise_timeout(signum, frame):
    raise CallTimeout()


def _warm_helper(modules: tuple[str, ...], math: bool, warmups: tuple[str, ...] = ()) -> None:
    # by name, so that a module that fails to import there is this call's exception, not a crashed helper
    for name in modules:
        importlib.import_module(name)
    if math:
        warm_math()
    for spec in warmups:  # verification.plugin_warmup
        mod, _, fn = spec.partition(":")
        getattr(importlib.import_module(mod), fn)()


def _kill(pool) -> None:
    for proc in list(getattr(pool, "_processes", {}).values()):
        proc.kill()
    pool.shutdown(wait=False, cancel_futures=True)


def _raised_by_the_function(fut, e: BaseException) -> bool:
    """Whether `e`, raised by fut.result(timeout), is the function's own exception rather than the wait's or a
    dead helper's (the executor sets BrokenProcessPool on the future as if the function had raised it)."""
    import concurrent.futures as cf

    return (fut is not None and not isinstance(e, cf.BrokenExecutor) and fut.done() and not fut.cancelled()
            and fut.exception() is e)


def _reset_helper() -> None:
    global _pool
    pool, _pool = _pool, None
    if pool is not None:
        _kill(pool)


def _helper(fn, args: tuple, warmups: tuple[str, ...] = ()):
    """The helper process, started and warmed for `fn` (and its plug-in's `warmups`) if there is none. A start that
    failed for these functions (the plug-in's module does not import there) fails every later call at once instead
    of starting again; one that died or ran out of time (a busy node) is tried again by the next call."""
    global _pool, _helper_error
    import concurrent.futures as cf
    import multiprocessing

    fns = (fn, *(a for a in args if callable(a)))
    key = (*fns, *warmups)
    if _helper_error is not None and _helper_error[0] == key:
        raise _helper_error[1].with_traceback(None)  # (a re-raise would grow its traceback on every row)
    if _pool is None:
        _pool = cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        _warmed.clear()
    if key not in _warmed:  # a new helper, or functions it has not loaded yet
        warmed = None
        try:
            warmed = _pool.submit(_warm_helper, tuple(f.__module__ for f in fns), grade_math in fns, warmups)
            warmed.result(timeout=HELPER_START_S)
        except BaseException as e:
            _reset_helper()
            if not _raised_by_the_function(warmed, e):
                if isinstance(e, cf.TimeoutError):
                    raise CallTimeout() from None
                raise  # the helper died (BrokenProcessPool): not remembered
            _helper_error = (key, e)
            raise
        _warmed.add(key)
    return _pool


def call_with_timeout(fn, args: tuple, timeout: float, warmups: tuple[str, ...] = ()):
    """fn(*args), bounded in wall time; raises CallTimeout.

    On the main thread (a Ray actor's default) an interval timer interrupts the call in place. Elsewhere
    signals are unavailable, so the call runs in a helper process that is killed and replaced on
    timeout (fn and args must then be picklable: plug-ins are module-level functions); a new helper first
    runs `warmups` ('module:function' names), under the helper's start limit.
    """
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGALRM, _raise_timeout)
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            return fn(*args)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    import concurrent.futures as cf

    with _pool_lock:
        pool = _helper(fn, args, warmups)
        try:
            call = pool.submit(fn, *args)
        except cf.BrokenExecutor:  # the helper died while idle (the OOM killer): the call never ran, so a new one
            _reset_helper()
            call = _helper(fn, args, warmups).submit(fn, *args)
        try:
            return call.result(timeout=timeout)
        except (cf.TimeoutError, cf.BrokenExecutor) as e:
            if _raised_by_the_function(call, e):  # e.g. the plug-in's own TimeoutError: its verdict
                raise
            # over time, or the helper died (out of memory, a crash in a plug-in): the next call gets a new one
            _reset_helper()
            if isinstance(e, cf.TimeoutError):
                raise CallTimeout() from None
            raise


def load_plugin(spec: str, key: str = "verification.verifier") -> Callable[[dict, str], float]:
    """`module:function` -> callable(problem_row, completion) -> reward in [0, 1]."""
    mod_name, sep, fn_name = spec.partition(":")
    if not sep or not mod_name or not fn_name:
        expected = "'math', 'code' or 'module:function'" if key == "verification.verifier" else "'module:function'"
        raise UserError(f"{key}: {spec!r} is not {expected}")
    try:
        mod = importlib.import_module(mod_name)
    except (Exception, SystemExit) as e:  # any import-time failure of user code (sys.exit too) is a user error
        raise UserError(f"{key}: cannot import {mod_name!r} ({type(e).__name__}: {e})") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise UserError(f"{key}: {spec!r} is not a callable")
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn):
        raise UserError(f"{key}: {spec!r} is an async or generator function; give a plain function that returns "
                        "its result")
    wants = PLUGIN_ARGS.get(key, ("problem", "completion"))
    try:  # a wrong signature would make every call fail, found only mid-run (every grade a verifier_error)
        inspect.signature(fn).bind(*wants)
    except TypeError:
        raise UserError(f"{key}: {spec!r} takes {inspect.signature(fn)}, but is called as "
                        f"{fn_name}({', '.join(wants)})") from None
    except ValueError:  # no signature to read (some built-ins): the first call will tell
        pass
    return fn


# what each kind of plug-in is called with
PLUGIN_ARGS = {"verification.verifier": ("problem", "completion"), "task.step_checker": ("problem", "completion"),
               "task.adapter": ("row",), "verification.plugin_warmup": ()}



def _plugin_reward(fn, problem: dict, completion: str) -> float:
    return float(fn(problem, completion))


class Verifier:
    """Grades rows that carry the problem's fields plus `completion`: 'math', 'code' or a plug-in."""

    def __init__(self, verifier: str = "math", config=None, warm: bool = True):
        """`warm=False` checks a plug-in's `verification.plugin_warmup` without running it (`check_verifier`)."""
        from .config import VerificationConfig

        self.name = verifier
        self.cfg = config or VerificationConfig()
        self._plugin = None if verifier in ("math", "code") else load_plugin(verifier)
        if self._plugin is not None:
            try:  # off the main thread (Ray Train's validation) each call goes to a helper process by pickle
                pickle.dumps(self._plugin)
            except Exception as e:
                raise UserError(f"verification.verifier: {verifier!r} cannot be pickled ({type(e).__name__}: {e}); "
                                "give a module-level function") from None
        self._warmups = self._plugin_warmup(warm)
        self._code = None
        if verifier == "math":
            warm_math()
        if verifier == "code":
            from .code_verifier import CodeGrader
            from .sandbox import Sandbox, SandboxLimits, SandboxUnavailable

            c = self.cfg
            limits = SandboxLimits(timeout_s=c.timeout_s, memory_mb=c.memory_mb, max_processes=c.max_processes,
                                   tmpfs_mb=c.tmpfs_mb, output_bytes=c.output_bytes, python=c.sandbox_python,
                                   site_packages=c.sandbox_site_packages)
            try:  # start the sandbox now: refuse to exist rather than run code unsandboxed later
                self._code = CodeGrader(limits, Sandbox(limits), problem_timeout_s=c.problem_timeout_s)
            except SandboxUnavailable as e:
                raise UserError(f"verification.verifier: code: {e}") from None

    def _plugin_warmup(self, warm: bool) -> tuple[str, ...]:
        """A plug-in's one-time set-up, run here on the main thread (where this process grades in place) and by
        each helper process before its first call elsewhere: never inside a sample's answer_timeout_s."""
        spec = self.cfg.plugin_warmup
        if not spec or self._plugin is None:  # (the config refuses a warm-up without a plug-in)
            return ()
        fn = load_plugin(spec, "verification.plugin_warmup")
        if not warm:
            return (spec,)
        here = threading.current_thread() is threading.main_thread()
        try:
            if here:
                call_with_timeout(fn, (), HELPER_START_S)
            else:  # grades go to the helper process (Ray Train's validation): start it now, so a failure is the
                with _pool_lock:  # M-step's one-line error at its start, not a verifier_error on every row
                    _helper(_plugin_reward, (self._plugin,), (spec,))  # the helper `grade`'s calls will find
        except CallTimeout:
            where = "" if here else " in the grading helper process (its start included)"
            raise UserError(f"verification.plugin_warmup: {spec!r} did not finish within {HELPER_START_S:.0f} s"
                            f"{where}") from None
        except Exception as e:
            import concurrent.futures as cf

            if isinstance(e, cf.BrokenExecutor):  # out of memory, a crash: not the warm-up's own exception
                raise UserError(f"verification.plugin_warmup: the grading helper process died while loading {spec!r}"
                                f" ({type(e).__name__})") from None
            what = "raised" if here else "failed in the grading helper process:"  # (or the plug-in's import there)
            raise UserError(f"verification.plugin_warmup: {spec!r} {what} {type(e).__name__}: {e}") from None
        return (spec,)

    def grade(self, problem: dict, completion: str) -> Grade:
        if not isinstance(completion, str):
            return Grade(0.0, "invalid_sample")
        try:
            if self._code is not None:
                verdict = self._code.grade(problem, completion)
                return Grade(1.0 if verdict == "passed" else 0.0, verdict)
            if self._plugin is None:
                return call_with_timeout(grade_math, (problem, completion), self.cfg.answer_timeout_s)
            score = call_with_timeout(_plugin_reward, (self._plugin, problem, completion), self.cfg.answer_timeout_s,
                                      self._warmups)
            if not 0.0 <= score <= 1.0:  # NaN included
                return Grade(0.0, "verifier_error:reward_out_of_range")
            return Grade(1.0, "passed") if score >= self.cfg.threshold else Grade(0.0, "wrong_answer")
        except CallTimeout:
            return Grade(0.0, "timeout")
        except Exception as e:  # a crash on one row is that row's verdict
            return Grade(0.0, f"verifier_error:{type(e).__name__}")

    def grade_batch(self, rows: list[dict]) -> list[dict]:
        out = []
        for r in rows:
            g = self.grade(r, r.get("completion"))
            out.append({**r, "reward": g.reward, "verdict": g.verdict})
        return out

    def close(self) -> None:
        if self._code is not None:
            self._code.close()


def resolve_verifier(name: str, task_kind: str) -> str:
    if name != "auto":
        return name
    return "math" if task_kind == "math" else "code"


REFERENCES_CHECKED = 20  # per split, by `check`: a few seconds in the sandbox


def check_verifier(cfg, local_sandbox: bool = True, splits: dict[str, list[dict]] | None = None) -> str:
    """Resolve and build the configured verifier once (imports a plug-in, starts a sandbox), so that a
    bad plug-in or a machine without bubblewrap fails before any run directory is written. Commands that
    grade in verifier actors (run, eval) pass local_sandbox=False: this machine need not run bubblewrap, and
    resources.check_verifier_on_cluster checks it where those actors run, once Ray is up (and runs a plug-in's
    warm-up there, which only imports here)."""
    name = resolve_verifier(cfg.verification.verifier, cfg.task.kind)
    if name != "code" or local_sandbox:
        v = Verifier(name, cfg.verification, warm=False)  # a plug-in's warm-up may want the workers' hardware
        try:
            if name == "code" and splits:
                check_references(v._code, splits)
        finally:
            v.close()
    return name


def check_references(grader, splits: dict[str, list[dict]]) -> None:
    """Each split's released reference solutions (the first REFERENCES_CHECKED), graded in the sandbox: a split
    whose references all fail would grade every answer 0 (RunError-free: a wrong_answer or runtime_error is the
    sample's verdict), so it is refused in one line; some failing is said, and the run may go on."""
    from .code_verifier import APPS_REFERENCE, reference_failures

    for split, problems in splits.items():
        checked, field, failed = reference_failures(grader, problems, REFERENCES_CHECKED)
        if not failed:
            continue
        what = (f"{split} split: {len(failed)} of the {checked} reference solutions checked ({field}) fail in the "
                f"sandbox ({', '.join(failed[:3])}{', ...' if len(failed) > 3 else ''})")
        # (APPS's human solutions are the judges' submissions, some of which fail its own tests: only said)
        if len(failed) == checked and field != APPS_REFERENCE:
            raise UserError(f"{what}: every answer would be graded 0; do its tests import a package the sandbox's "
                            "Python (verification.sandbox_python; packages only with sandbox_site_packages) lacks, or need higher "
                            "verification limits (timeout_s, memory_mb)?")
        print(f"[restem] warning: {what}; answers to those problems cannot pass")
