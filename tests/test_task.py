from restem_ray.builtin import build_tokenizer
from restem_ray.sft import IGNORE, encode
from restem_ray.tasks.arithmetic import ArithmeticTask, check_steps
from restem_ray.verification import grade_math


def small():
    return ArithmeticTask(n_seed=200, n_train=300, n_valid=50, n_test=100, n_transfer=50)


def test_splits_are_deterministic_disjoint_and_sized():
    a, b = small().splits(), small().splits()
    assert a == b
    assert {k: len(v) for k, v in a.items()} == {"seed": 200, "train": 300, "valid": 50, "test": 100, "transfer": 50}
    prompts = [r["prompt"] for rows in a.values() for r in rows]
    ids = [r["id"] for rows in a.values() for r in rows]
    assert len(set(ids)) == len(ids)
    assert len(set(prompts)) == len(prompts)
    assert all("solution" in r for r in a["seed"]) and not any("solution" in r for r in a["train"])


def test_worked_solutions_are_correct_and_graded_as_passed():
    task = small()
    for r in task.splits()["seed"]:
        # the steps recompute: undo digit reversal, each term is the sum of the two before it
        a, b, _, k = r["prompt"].split("\n")[0].split()[1:]
        a, b = int(a[::-1]), int(b[::-1])
        steps = r["solution"].split("####")[0].strip().rstrip(".").split(" . ")
        assert len(steps) == int(k)
        for s in steps:
            lhs, rhs = s.split(" = ")
            x, op, y = lhs.split()
            assert (int(x[::-1]), op, int(y[::-1]), int(rhs[::-1])) == (a, "+", b, a + b)
            a, b = b, a + b
        assert r["answer"] == str(b).zfill(3)[::-1]
        assert grade_math(r, r["solution"]).reward == 1.0


def starts(prompt):
    return [int(x[::-1]) for x in prompt.split()[1:3]]


def test_transfer_split_starts_below_the_trained_range():
    s = small().splits()
    assert all(min(starts(r["prompt"])) < 10 for r in s["transfer"])
    assert all(10 <= x <= 99 for split in ("seed", "train", "test") for r in s[split] for x in starts(r["prompt"]))


def test_numbers_are_fixed_width_reversed():
    r = small().splits()["seed"][0]
    nums = [t for t in r["prompt"][3:].split() + r["solution"].split() if t.isdigit() and t != r["prompt"].split()[4]]
    assert nums and all(len(n) == 3 for n in nums)
    first = r["prompt"].split()[1]
    assert 10 <= int(first[::-1]) <= 99


def test_step_checker_rejects_right_answers_reached_through_wrong_steps():
    task = small()
    rewritten = 0
    for r in task.splits()["seed"][:50]:
        sol = r["solution"]
        assert check_steps(r, sol) == 1.0
        x, op, y = sol.split(" . ")[0].split()[:3]
        # a wrong first equation (another second operand), with the true final answer kept: answer-only passes
        wrong = sol.replace(f"{x} {op} {y} =", f"{x} {op} {str(int(y[::-1]) % 90 + 10).zfill(3)[::-1]} =", 1)
        if wrong != sol:
            assert grade_math(r, wrong).reward == 1.0 and check_steps(r, wrong) == 0.0
            rewritten += 1
        assert check_steps(r, " . ".join(sol.split(" . ")[1:])) == 0.0  # a step left out
        assert check_steps(r, sol.split("####")[0] + "#### 000") == 0.0
        assert check_steps(r, "#### " + r["answer"]) == 0.0
        assert check_steps(r, sol.split("####")[0] + "#### =091") == 0.0  # malformed answers are just wrong
    assert rewritten >= 40, rewritten  # (an operand that reads the same reversed keeps its equation: skipped)
    assert check_steps({"prompt": "Q: x + 1\nA:"}, "#### 1") == 0.0
    # under a few-shot prompt the question is the last one, not the first exemplar's
    a, b = task.splits()["seed"][:2]
    few_shot = {**b, "prompt": a["prompt"] + " " + a["solution"] + "\n\n" + b["prompt"]}
    assert check_steps(few_shot, b["solution"]) == 1.0 and check_steps(few_shot, a["solution"]) == 0.0


def test_encode_masks_prompt_and_appends_eos():
    tok = build_tokenizer()
    ids, labels = encode(tok, "Q: 1\nA:", " 2 #### 2", 64)
    n_prompt = len(tok("Q: 1\nA:").input_ids)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert labels[:n_prompt] == [IGNORE] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert tok.decode(ids[n_prompt:-1]) == " 2 #### 2"


def _slow_build(root, counter):
    import time

    from restem_ray.builtin import build_once

    def build(tmp):
        with open(counter, "a") as f:
            f.write("built\n")
        time.sleep(1.0)  # long enough for the other process to arrive while this one builds
        (tmp / "weights").write_text("w")

    return build_once(root, build, log=lambda msg: None)


def test_a_cache_folder_is_built_once_by_processes_that_ask_together_and_never_half(tmp_path):
    import multiprocessing

    import pytest

    from restem_ray.builtin import build_once

    root, counter = tmp_path / "cache" / "model", tmp_path / "count"
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        built = pool.starmap(_slow_build, [(root, counter), (root, counter)])
    assert sorted(built) == [False, True] and counter.read_text() == "built\n"
    assert (root / "weights").read_text() == "w" and (root / "DONE").is_file()

    def failing(tmp):
        (tmp / "half").write_text("x")
        raise RuntimeError("out of disk")

    other = tmp_path / "cache" / "other"
    with pytest.raises(RuntimeError, match="out of disk"):
        build_once(other, failing)
    assert not other.exists() and [p.name for p in other.parent.iterdir() if "tmp" in p.name] == []
    assert build_once(other, lambda tmp: (tmp / "weights").write_text("w")) and (other / "DONE").is_file()
