"""Bad input of any kind: exit code 2, one line naming the key or file:line, nothing written."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from restem_ray.builtin import build_tokenizer, ensure_builtin
from restem_ray.cli import main

GOOD = [{"id": i, "prompt": f"Q{i}", "answer": str(i)} for i in range(3)]


@pytest.fixture
def world(tmp_path):
    """A valid config with data and a model folder (config.json + tokenizer), all in tmp_path."""
    for name in ("train", "valid"):  # (problems of their own: a train problem also in valid would leave train)
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps(r if name == "train" else dict(r, prompt=f"valid {r['prompt']}")) + "\n" for r in GOOD))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    build_tokenizer().save_pretrained(model)
    tree = {"task": {"train_file": "train.jsonl", "valid_file": "valid.jsonl"}, "model": {"base": "model"}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(tree))
    return tmp_path


def jsonl_lines(world, lines):
    (world / "train.jsonl").write_bytes(b"".join(x + b"\n" for x in lines))


def edit_config(world, fn):
    tree = yaml.safe_load((world / "cfg.yaml").read_text())
    fn(tree)
    (world / "cfg.yaml").write_text(yaml.safe_dump(tree))


def set_model(world, path):
    edit_config(world, lambda t: t["model"].update(base=str(path)))


CASES = {
    "unknown top key": (lambda w: edit_config(w, lambda t: t.update(sampler={"n": 3})), [], "sampler: unknown key"),
    "unknown nested key": (None, ["--set", "training.lrr=3"], "training.lrr: unknown key"),
    "wrong type": (None, ["--set", "training.lr=fast"], "training.lr: Input should be a valid number"),
    "out of range": (None, ["--set", "sampling.samples_per_problem=0"], "sampling.samples_per_problem"),
    "bad choice": (None, ["--set", "training.zero_stage=5"], "training.zero_stage"),
    "bad bool": (None, ["--set", "training.restart_from_base=maybe"], "training.restart_from_base"),
    "set without =": (None, ["--set", "loop.iterations"], "expected key.path=value"),
    "force without resume": (None, ["--force"], "--force accepts a changed config when resuming"),
    # the adaptive E-step's first round would leave the easiest problems without a sample, and without solutions
    "adaptive budget under a round": (None, ["--set", "sampling.adaptive=true", "--set", "sampling.budget=2"],
                                      "sampling.budget: 2 samples cannot give each of the"),
    "adaptive default budget under a round": (None, ["--set", "sampling.adaptive=true", "--set",
                                                     "sampling.samples_per_problem=2", "--set",
                                                     "sampling.round_size=4", "--set",
                                                     "sampling.max_samples_per_problem=8"],
                                              "sampling.budget (default: samples_per_problem 2 x the train problems)"),
    "set into a value": (None, ["--set", "task.train_file.x=1"], "'train_file' is not a section"),
    "config not yaml": (lambda w: (w / "cfg.yaml").write_text("task: [oops\n"), [], "cfg.yaml:2: not valid YAML"),
    "config is a list": (lambda w: (w / "cfg.yaml").write_text("- 1\n- 2\n"), [], "top level must be a mapping"),
    "missing model section": (lambda w: edit_config(w, lambda t: t.pop("model")), [], "model: required key is missing"),
    "code task, math verifier": (None, ["--set", "task.kind=code", "--set", "verification.verifier=math"],
                                 "'math' cannot grade a code task"),
    "train file missing": (lambda w: (w / "train.jsonl").unlink(), [], "train.jsonl: problem file not found"),
    "line not json": (lambda w: jsonl_lines(w, [json.dumps(GOOD[0]).encode(), b"{oops"]), [], "train.jsonl:2: not valid JSON"),
    "line lacks prompt": (lambda w: jsonl_lines(w, [json.dumps({"id": 1, "answer": "1"}).encode()]), [],
                          "train.jsonl:1: missing or empty field 'prompt'"),
    "line lacks answer": (lambda w: jsonl_lines(w, [json.dumps({"id": 1, "prompt": "q"}).encode()]), [],
                          "train.jsonl:1: missing or empty field 'answer'"),
    "duplicate id": (lambda w: jsonl_lines(w, [json.dumps(GOOD[0]).encode()] * 2), [], "train.jsonl:2: duplicate id '0'"),
    "not utf-8": (lambda w: jsonl_lines(w, [b'{"id": 1, "prompt": "\xff"}']), [], "train.jsonl:1: not UTF-8"),
    "empty file": (lambda w: jsonl_lines(w, []), [], "train.jsonl: no problems in file"),
    "line is a list": (lambda w: jsonl_lines(w, [b"[1, 2]"]), [], "train.jsonl:1: expected a JSON object"),
    "csv data": (lambda w: (edit_config(w, lambda t: t["task"].update(train_file="t.csv")),
                            (w / "t.csv").write_text("id,prompt\n")), [], "t.csv: unknown problem file type"),
    "corrupt parquet": (lambda w: (edit_config(w, lambda t: t["task"].update(train_file="t.parquet")),
                                   (w / "t.parquet").write_bytes(b"PAR1 not really")), [], "t.parquet: not a readable Parquet file"),
    "parquet lacks prompt": (lambda w: (edit_config(w, lambda t: t["task"].update(train_file="p.parquet")),
                                        pq.write_table(pa.Table.from_pylist([{"id": "a", "answer": "1"}]), w / "p.parquet")),
                             [], "p.parquet:1 (row): missing or empty field 'prompt'"),
    "model folder missing": (lambda w: set_model(w, w / "nope"), [], "model.base:"),
    "model a hub id": (lambda w: edit_config(w, lambda t: t["model"].update(base="Qwen/Qwen2.5-0.5B")), [],
                       "Qwen/Qwen2.5-0.5B: no such folder (a local folder or a URI; a Hugging Face Hub id is not "
                       "downloaded"),
    "model folder without config": (lambda w: (w / "model" / "config.json").unlink(), [],
                                    "not an HF model folder (no config.json)"),
    "model without tokenizer": (lambda w: [p.unlink() for p in (w / "model").iterdir() if p.name != "config.json"],
                                [], "no tokenizer files"),
    "model with its own code": (lambda w: (w / "model" / "config.json").write_text(json.dumps(
        {"model_type": "foo_custom", "auto_map": {"AutoModelForCausalLM": "modeling_foo.FooForCausalLM"}})), [],
        "model type 'foo_custom' comes with its own code (auto_map), which restem-ray runs only with "
        "model.trust_remote_code: true"),
    "trust_remote_code in engine_kwargs": (None, ["--set", "sampling.engine_kwargs.trust_remote_code=true"],
                                           "sampling.engine_kwargs.trust_remote_code: set by restem-ray (the tokenizer "
                                           "and the M-step load the model too: set model.trust_remote_code)"),
    "model type transformers lacks": (lambda w: (w / "model" / "config.json").write_text(json.dumps(
        {"model_type": "qwen9"})), [], "does not know model type 'qwen9'"),
    "config.json not json": (lambda w: (w / "model" / "config.json").write_text("{"), [], "config.json: not valid JSON"),
    "plug-in not importable": (None, ["--set", "verification.verifier=no_such_mod_xyz:grade"],
                               "cannot import 'no_such_mod_xyz'"),
    "plug-in not callable": (None, ["--set", "verification.verifier=json:__doc__"], "is not a callable"),
    "control arm without seed data": (None, ["--set", "control.enabled=true"], "need task.seed_file"),
    "step checker not importable": (None, ["--set", "task.step_checker=no_such_mod_xyz:f"],
                                    "task.step_checker: cannot import 'no_such_mod_xyz'"),
    "seed file lacks solutions": (lambda w: ((w / "seed.jsonl").write_text(json.dumps(GOOD[0]) + "\n"),
                                             edit_config(w, lambda t: t["task"].update(seed_file="seed.jsonl"))),
                                  [], "seed.jsonl:1: missing or empty field 'solution'"),
    "stop-after not a phase": (None, ["--stop-after", "9/generate"], "--stop-after 9/generate: not a phase of this run"),
    "stop-after control arm off": (None, ["--stop-after", "control/eval"], "--stop-after control/eval: not a phase"),
    "plug-in spec malformed": (None, ["--set", "verification.verifier=justaname"], "is not 'math', 'code' or 'module:function'"),
    # released formats (task.dataset, columns, valid_split) and the prompt layer
    "gsm8k row without final answer": (lambda w: jsonl_lines(w, [json.dumps({"question": "q", "answer": "4"}).encode()]),
                                       ["--set", "task.dataset=gsm8k"], "train.jsonl:1: field 'answer': no '#### N' final answer"),
    "math row without a box": (lambda w: jsonl_lines(w, [json.dumps({"problem": "p", "solution": "it is 4"}).encode()]),
                               ["--set", "task.dataset=math"], "train.jsonl:1: field 'solution': no \\boxed{...} final answer"),
    "gsm8k row lacks question": (lambda w: jsonl_lines(w, [json.dumps({"answer": "#### 4"}).encode()]),
                                 ["--set", "task.dataset=gsm8k"], "train.jsonl:1: missing or empty field 'question'"),
    "dataset of another kind": (None, ["--set", "task.dataset=humaneval"],
                                "task.dataset 'humaneval' is a code dataset: set task.kind: code"),
    "dataset and adapter": (None, ["--set", "task.dataset=gsm8k", "--set", "task.adapter=m:f"], "give one, not both"),
    "column not in file": (None, ["--set", "task.columns={prompt: question}"],
                           "train.jsonl:1: task.columns.prompt: no column 'question'"),
    "valid file and valid split": (None, ["--set", "task.valid_split=1"],
                                   "task.valid_file and task.valid_split: give one, not both"),
    "no valid file nor split": (lambda w: edit_config(w, lambda t: t["task"].pop("valid_file")), [],
                                "task.valid_file: required key is missing (or carve one out of train_file"),
    "valid split leaves no train": (lambda w: edit_config(w, lambda t: t["task"].pop("valid_file")),
                                    ["--set", "task.valid_split=3"], "task.valid_split: 3 of the 3 problems in"),
    "valid split fraction above 1": (lambda w: edit_config(w, lambda t: t["task"].pop("valid_file")),
                                     ["--set", "task.valid_split=1.5"], "neither a fraction between 0 and 1 nor a count"),
    "template field missing": (None, ["--set", "prompt.template='Q: {question}'"],
                               "train.jsonl:1: prompt.template uses field 'question', which this row lacks"),
    "template not a field name": (None, ["--set", "prompt.template='Q{0}'"], "prompt.template: {0} is not a field name"),
    "template unbalanced brace": (None, ["--set", "prompt.template='\\boxed{'"], "prompt.template: not a valid format string"),
    "standard shots without dataset": (None, ["--set", "prompt.few_shot=standard"],
                                       "prompt.few_shot: standard exemplars exist for task.dataset gsm8k and math"),
    "exemplar file missing": (None, ["--set", "prompt.few_shot=/nonexistent/shots.jsonl"],
                              "/nonexistent/shots.jsonl: exemplar file (prompt.few_shot) not found"),
    "exemplar lacks answer": (lambda w: ((w / "shots.jsonl").write_text(json.dumps({"question": "q"}) + "\n"),
                                         edit_config(w, lambda t: t.update(prompt={"few_shot": "shots.jsonl"}))),
                              [], "shots.jsonl:1: an exemplar needs 'question' (or 'prompt') and 'solution' (or 'answer')"),
    "few-shot n without few-shot": (None, ["--set", "prompt.few_shot_n=2"], "need prompt.few_shot"),
    "shot format without answer": (None, ["--set", "prompt.few_shot=standard", "--set", "prompt.shot_format='Q: {question}'"],
                                   "prompt.shot_format: needs {question} then {answer}"),
    "chat template required, none": (None, ["--set", "prompt.chat_template=true"], "has no chat template"),
    "corrupt gzip data": (lambda w: (edit_config(w, lambda t: t["task"].update(train_file="t.jsonl.gz")),
                                     (w / "t.jsonl.gz").write_bytes(corrupt_gzip())), [], "t.jsonl.gz: not a readable gzip file"),
    "code row with unusable tests": (lambda w: jsonl_lines(w, [json.dumps({"id": 1, "prompt": "p", "input_output":
                                                                           '{"inputs": "abc", "outputs": "xyz"}'}).encode()]),
                                     ["--set", "task.kind=code", "--set", "verification.verifier=code"],
                                     "train.jsonl:1: field 'input_output': needs a JSON object with non-empty 'inputs'"),
    "code row with a non-name entry point": (lambda w: jsonl_lines(w, [json.dumps({"id": 1, "prompt": "p", "test": "x",
                                                                                   "entry_point": ["f"]}).encode()]),
                                             ["--set", "task.kind=code", "--set", "verification.verifier=code"],
                                             "train.jsonl:1: missing or empty field 'test/entry_point or input_output'"),
    "code row with an entry point that is no name": (lambda w: jsonl_lines(w, [json.dumps({"id": 1, "prompt": "p",
                                                                                           "test": "x",
                                                                                           "entry_point": "f x"}).encode()]),
                                                     ["--set", "task.kind=code", "--set", "verification.verifier=code"],
                                                     "train.jsonl:1: field 'entry_point': 'f x' is not a function name"),
    "template format spec": (None, ["--set", "prompt.template='{prompt:d}'"],
                             "prompt.template: {prompt:d} has a conversion or format spec"),
    "template conversion": (None, ["--set", "prompt.template='{prompt!r}'"],
                            "prompt.template: {prompt!r} has a conversion or format spec"),
    "recursive yaml anchor": (lambda w: (w / "cfg.yaml").write_text((w / "cfg.yaml").read_text()
                                                                    + "sampling: {engine_kwargs: &a {x: *a}}\n"),
                              [], "cfg.yaml: a YAML anchor refers to itself"),
    "seed out of range": (None, ["--set", "seed=4294967296"], "seed: Input should be less than 4294967296"),
    "max_seq_len below prompt + max_tokens": (None, ["--set", "training.max_seq_len=100"],
                                              "training.max_seq_len 100 is shorter than the longest train prompt (3 "
                                              "tokens, problem '0') + sampling.max_tokens 512 = 515"),
    "extra eval split named valid": (None, ["--set", "task.extra_eval_files={valid: train.jsonl}"],
                                     "task.extra_eval_files.valid: 'valid' is a built-in split name"),
    "deepspeed file not utf-8": (lambda w: ((w / "ds.json").write_bytes(b'{"a": "\xff"}'),
                                            edit_config(w, lambda t: t.update(training={"deepspeed": "ds.json"}))),
                                 [], "ds.json': cannot read (UnicodeDecodeError)"),
    "ray address without a port": (None, ["--set", "ray.address=headnode"], "ray.address: 'headnode': expected HOST:PORT"),
    "json nested too deeply": (lambda w: jsonl_lines(w, [b'{"id": 1, "prompt": "q", "answer": ' + b"[" * 200000
                                                         + b"]" * 200000 + b"}"]), [], "train.jsonl:1: JSON nested too deeply"),
    "lone surrogate": (lambda w: jsonl_lines(w, [b'{"id": 1, "prompt": "q\\ud800", "answer": "1"}']), [],
                       "train.jsonl:1: field 'prompt' holds text that is not valid Unicode (a lone surrogate)"),
    "id a list": (lambda w: jsonl_lines(w, [b'{"id": [], "prompt": "q", "answer": "1"}']), [],
                  "train.jsonl:1: field 'id' must be non-empty text or a number (got list [])"),
    "id true": (lambda w: jsonl_lines(w, [b'{"id": true, "prompt": "q", "answer": "1"}']), [],
                "train.jsonl:1: field 'id' must be non-empty text or a number (got bool True)"),
    "id NaN": (lambda w: jsonl_lines(w, [b'{"id": NaN, "prompt": "q", "answer": "1"}']), [],
               "train.jsonl:1: field 'id' must be non-empty text or a number (got NaN nan)"),
    "answer bytes": (lambda w: (edit_config(w, lambda t: t["task"].update(train_file="a.parquet")),
                                pq.write_table(pa.Table.from_pylist([{"id": "a", "prompt": "q", "answer": b"1"}]),
                                               w / "a.parquet")),
                     [], "a.parquet:1 (row): field 'answer' must be text or a number (got bytes)"),
    "answer NaN": (lambda w: jsonl_lines(w, [b'{"id": 1, "prompt": "q", "answer": NaN}']), [],
                   "train.jsonl:1: field 'answer' must be text or a number (got NaN)"),
    "parquet prompt as bytes": (lambda w: (edit_config(w, lambda t: t["task"].update(train_file="b.parquet")),
                                           pq.write_table(pa.Table.from_pylist([{"id": "a", "prompt": b"q", "answer": "1"}]),
                                                          w / "b.parquet")),
                                [], "b.parquet:1 (row): field 'prompt' is bytes, not text"),
    "model_type not a name": (lambda w: (w / "model" / "config.json").write_text(json.dumps({"model_type": ["llama"]})),
                              [], "model_type must be a name (got list)"),
    "config key given twice": (lambda w: (w / "cfg.yaml").write_text((w / "cfg.yaml").read_text() + "task: {}\n"), [],
                               "key 'task' given twice"),
    "non-finite float": (None, ["--set", "verification.answer_timeout_s=.inf"],
                         "verification.answer_timeout_s: Input should be a finite number"),
    "data file unreadable": (lambda w: ((w / "t.jsonl").symlink_to("/proc/self/mem"),
                                        edit_config(w, lambda t: t["task"].update(train_file="t.jsonl"))),
                             [], "t.jsonl: cannot read (Input/output error)"),
    "data file a folder": (lambda w: ((w / "d.jsonl").mkdir(), edit_config(w, lambda t: t["task"].update(train_file="d.jsonl"))),
                           [], "d.jsonl: is a folder, not a problem file"),
    "config file unreadable": (lambda w: ((w / "cfg.yaml").unlink(), (w / "cfg.yaml").symlink_to("/proc/self/mem")),
                               [], "cfg.yaml: cannot read (Input/output error)"),
    "config not utf-8": (lambda w: (w / "cfg.yaml").write_bytes(b"task: {train_file: \xff}\n"), [], "cfg.yaml: not UTF-8"),
    "answer an object": (lambda w: jsonl_lines(w, [b'{"id": 1, "prompt": "q", "answer": {"v": "401"}}']), [],
                         "train.jsonl:1: field 'answer' must be text or a number (got dict)"),
    "empty stop string": (None, ["--set", "sampling.stop=['']"], "sampling.stop.0: String should have at least 1 character"),
    "empty rendered prompt": (None, ["--set", "prompt.template=' '"],
                              "train problem '0': its rendered prompt is empty (prompt.template ' '"),
    "humaneval test not python": (lambda w: jsonl_lines(w, [json.dumps({"id": 1, "prompt": "def f():\n", "entry_point": "f",
                                                                        "test": "assert candidate(1 =="}).encode()]),
                                  ["--set", "task.kind=code", "--set", "verification.verifier=code"],
                                  "train.jsonl:1: field 'test': not valid Python"),
    "humaneval test without check": (lambda w: jsonl_lines(w, [json.dumps({"id": 1, "prompt": "def f():\n", "entry_point": "f",
                                                                           "test": "assert True"}).encode()]),
                                     ["--set", "task.kind=code", "--set", "verification.verifier=code"],
                                     "train.jsonl:1: field 'test': defines no check(candidate)"),
    "gsm8k row with a stray id": (lambda w: jsonl_lines(w, [json.dumps({"question": "q", "answer": "#### 4"}).encode(),
                                                            json.dumps({"question": "r", "answer": "#### 5",
                                                                        "id": "x"}).encode()]),
                                  ["--set", "task.dataset=gsm8k"], "train.jsonl:1: missing or empty field 'id' "
                                  "(train.jsonl:2 has one: give every row an id, or none, to number them by row)"),
    "model without weights": (lambda w: (w / "model" / "config.json").write_text(json.dumps(
        {"model_type": "llama", "architectures": ["LlamaForCausalLM"]})), [],
        "/model: no weights (*.safetensors or pytorch_model*.bin)"),
    "model weights cut short": (lambda w: ((w / "model" / "config.json").write_text(json.dumps(
        {"model_type": "llama", "architectures": ["LlamaForCausalLM"]})),
        (w / "model" / "model.safetensors").write_bytes(b"\x10\x27\x00\x00\x00\x00\x00\x00{\"w\": ")), [],
        "model.safetensors: not a whole safetensors file (cut short or damaged)"),
    "model weights cut short in the data": (lambda w: cut_weights(w), [],
                                            "model.safetensors: not a whole safetensors file (cut short or damaged)"),
    "model shard missing": (lambda w: ((w / "model" / "config.json").write_text(json.dumps(
        {"model_type": "llama", "architectures": ["LlamaForCausalLM"]})),
        (w / "model" / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))), [],
        "model-00001-of-00002.safetensors: a shard model.safetensors.index.json names is missing"),
    "async plug-in": (None, ["--set", "verification.verifier=asyncio:sleep"],
                      "verification.verifier: 'asyncio:sleep' is an async or generator function"),
    "ray address nobody listens at": (None, ["--set", "ray.address=127.0.0.1:9"],
                                      "ray.address: 127.0.0.1:9: cannot reach a Ray cluster there (Connection refused)"),
    # refused at the start, not at the first M-step's model load or the first verifier's start (mid-run)
    "attention transformers does not know": (None, ["--set", "training.attn_implementation=flash_attn2"],
                                             "training.attn_implementation: 'flash_attn2' is not an attention"),
    "CPUs as a verifier's custom resource": (None, ["--set", "verification.resources={CPU: 1}"],
                                             "verification.resources.CPU: custom resources only"),
    "GPUs as a training worker's custom resource": (None, ["--set", "training.resources_per_worker={GPU: 1}"],
                                                    "training.resources_per_worker.GPU: custom resources only"),
    "an empty split stop string": (None, ["--set", "sampling.split_stop={valid: ['']}"], "sampling.split_stop.valid.0"),
    "LoRA targets not a regular expression": (None, ["--set", "training.lora_rank=8", "--set",
                                                     "training.lora_target_modules=q_proj("],
                                              "training.lora_target_modules: 'q_proj(' is not a valid regular expression"),
    "a config key YAML reads as a date": (lambda w: (w / "cfg.yaml").write_text(
        (w / "cfg.yaml").read_text().replace("task:\n", "task:\n  columns:\n    2024-06-01: x\n")), [],
        "cfg.yaml: key 'task.columns.2024-06-01': is not text (quote it)"),
    "a config nested too deeply": (lambda w: (w / "cfg.yaml").write_text(
        (w / "cfg.yaml").read_text() + "ray:\n  address: " + "[" * 5000 + "]" * 5000 + "\n"), [],
        "cfg.yaml: nested too deeply"),
    "a seed of thousands of digits": (None, ["--set", "seed=" + "9" * 5000],
                                      "seed: Input should be less than 4294967296 (got 99999"),
    "parquet column Python cannot hold": (lambda w: parquet_train(w, pa.table({
        "id": ["a"], "prompt": ["q"], "answer": ["1"], "created": pa.array([10 ** 13], pa.timestamp("s"))})),
        [], "train.parquet: not a readable Parquet file (OverflowError"),
    "eos id that is no id": (lambda w: (w / "model" / "generation_config.json").write_text('{"eos_token_id": 2.0}'),
                             ["--set", "prompt.template={prompt}"],
                             "generation_config.json: eos_token_id must be a token id or a list of ids (got 2.0)"),
    "code case calling no function name": (lambda w: jsonl_lines(w, [json.dumps({
        "id": 1, "prompt": "p", "input_output": json.dumps({"inputs": [[0]], "outputs": [1], "fn_name": "add one"})
    }).encode()]), ["--set", "task.kind=code"], "train.jsonl:1: field 'input_output': fn_name 'add one' is not a function"),
}


def parquet_train(w, table):
    pq.write_table(table, w / "train.parquet")
    edit_config(w, lambda t: t["task"].update(train_file="train.parquet"))


def cut_weights(w):
    """A model folder whose safetensors file lost its second half (a copy cut short: the header is whole)."""
    import torch
    from safetensors.torch import save_file

    (w / "model" / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    save_file({"w": torch.zeros(1000)}, str(w / "model" / "model.safetensors"))
    data = (w / "model" / "model.safetensors").read_bytes()
    (w / "model" / "model.safetensors").write_bytes(data[: len(data) // 2])


def corrupt_gzip() -> bytes:
    """A gzip stream whose compressed bytes are damaged (zlib's error, not a truncated file's EOFError)."""
    import gzip

    data = bytearray(gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in GOOD * 50)))
    for i in range(20, 40):
        data[i] ^= 0xFF
    return bytes(data)


def snapshot(root):
    return {p: p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_with_one_line(world, capsys, case):
    prepare, extra, needle = CASES[case]
    if prepare:
        prepare(world)
    before = snapshot(world)
    rc = main(["run", str(world / "cfg.yaml"), "--out", str(world / "run"), *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("restem-ray: error: ") and err.count("\n") == 1, err
    assert needle in err, err
    assert snapshot(world) == before  # nothing written, the run directory not even created


def test_run_dir_that_holds_a_run_or_nothing_to_resume(world, capsys):
    (world / "run").mkdir()
    assert main(["run", str(world / "cfg.yaml"), "--out", str(world / "run"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    (world / "run" / "manifest.json").write_text("{}")
    assert main(["run", str(world / "cfg.yaml"), "--out", str(world / "run")]) == 2
    assert "already holds a run (use --resume" in capsys.readouterr().err


def test_a_run_directory_that_holds_other_files_is_refused(world, capsys):
    """`--out .` beside a config.yaml of the user's would write the run's config.yaml over it."""
    before = snapshot(world)
    assert main(["run", str(world / "cfg.yaml"), "--out", str(world)]) == 2
    err = capsys.readouterr().err
    assert f"{world}: not empty (cfg.yaml, model, train.jsonl, ...) and holds no run" in err and err.count("\n") == 1
    assert snapshot(world) == before


def test_stop_after_a_phase_the_resumed_run_already_did(world, capsys):
    (world / "run").mkdir()
    (world / "run" / "manifest.json").write_text(json.dumps({"version": 1, "completed": {"0/eval": 1.0}}))
    (world / "run" / "config.yaml").write_text((world / "cfg.yaml").read_text())
    before = snapshot(world)
    assert main(["run", str(world / "cfg.yaml"), "--out", str(world / "run"), "--resume", "--force",
                 "--stop-after", "0/eval"]) == 2
    assert "--stop-after 0/eval: that phase is already complete" in capsys.readouterr().err
    assert snapshot(world) == before


def test_demo_rejects_bad_override_before_building(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RESTEM_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "--out", str(tmp_path / "run"), "--set", "training.epochs=-1"]) == 2
    assert "training.epochs" in capsys.readouterr().err
    assert main(["demo", "--quick", "--out", str(tmp_path / "run"), "--stop-after", "2/eval"]) == 2
    assert "--stop-after 2/eval: not a phase" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)  # (the default --out is a new restem-runs/demo-... folder: nothing to resume)
    assert main(["demo", "--quick", "--resume"]) == 2
    assert "--resume: give the run directory to continue with --out" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()
    assert not (tmp_path / "restem-runs").exists()


def test_debug_shows_the_traceback(world):
    from restem_ray.errors import UserError

    with pytest.raises(UserError, match="training.lr"):
        main(["--debug", "run", str(world / "cfg.yaml"), "--out", str(world / "run"), "--set", "training.lr=x"])


@pytest.mark.parametrize("out, needle", [
    ("nosuchscheme://bucket/run", "--out nosuchscheme://bucket/run: cannot open ("),
    ("file://{world}/train.jsonl", "--out file://{world}/train.jsonl: is a file, not a run directory"),
])
def test_run_dir_uri_that_cannot_hold_a_run(world, capsys, monkeypatch, out, needle):
    """A run directory given as a URI (restem_ray/mirror.py) is checked like a path: one line, exit 2, nothing
    written (the S3 cases, a missing bucket and an unreachable endpoint: tests/test_object_storage.py)."""
    monkeypatch.setenv("RESTEM_RUN_CACHE", str(world / "cache"))
    before = snapshot(world)
    assert main(["run", str(world / "cfg.yaml"), "--out", out.format(world=world)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("restem-ray: error: ") and err.count("\n") == 1, err
    assert needle.format(world=world) in err, err
    assert snapshot(world) == before


def test_a_plug_in_that_exits_at_import_is_a_user_error(world, capsys, monkeypatch):
    (world / "exits_at_import.py").write_text("raise SystemExit(0)\n")
    monkeypatch.syspath_prepend(str(world))
    for cmd in ("check", "run"):
        args = [cmd, str(world / "cfg.yaml"), *(["--out", str(world / "run")] if cmd == "run" else []),
                "--set", "verification.verifier=exits_at_import:grade"]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "cannot import 'exits_at_import' (SystemExit" in err and err.count("\n") == 1, err
    assert not (world / "run").exists()


PLUGINS = """
import sys
def no_args():
    return 1.0
def exits(row):
    sys.exit(0)
def grade(problem, completion):
    return 1.0
"""


@pytest.mark.parametrize("key,spec,needle", [
    ("verification.verifier", "plg:no_args", "verification.verifier: 'plg:no_args' takes (), but is called as "
                                             "no_args(problem, completion)"),
    ("task.step_checker", "plg:no_args", "task.step_checker: 'plg:no_args' takes (), but is called as "
                                         "no_args(problem, completion)"),
    ("task.adapter", "plg:grade", "task.adapter: 'plg:grade' takes (problem, completion), but is called as grade(row)"),
    ("task.adapter", "plg:exits", "train.jsonl:1: task.adapter plg:exits: SystemExit: 0"),
])
def test_a_plug_in_of_the_wrong_signature_or_that_exits_is_one_line_at_check(world, capsys, monkeypatch, key, spec,
                                                                              needle):
    """A wrong signature would fail every call mid-run (every grade a verifier_error, every kept sample a false
    positive); an adapter that calls sys.exit made `check` and `run` exit 0 having done nothing."""
    (world / "plg.py").write_text(PLUGINS)
    monkeypatch.syspath_prepend(str(world))
    before = snapshot(world)
    for cmd in ("check", "run"):
        args = [cmd, str(world / "cfg.yaml"), *(["--out", str(world / "run")] if cmd == "run" else []),
                "--set", f"{key}={spec}"]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err
    assert snapshot(world) == before


def test_check_loads_the_step_checker_as_run_does(world, capsys):
    assert main(["check", str(world / "cfg.yaml"), "--set", "task.step_checker=no_such_mod_xyz:f"]) == 2
    assert "task.step_checker: cannot import 'no_such_mod_xyz'" in capsys.readouterr().err


def test_demo_checks_its_inputs_before_ray(tmp_path, capsys, monkeypatch):
    """`demo --set` can point the built-in run at other files and lengths: checked as `run` checks them."""
    ensure_builtin()  # on a fresh machine this test may be the first to need it: its build's progress is not the error
    capsys.readouterr()
    assert main(["demo", "--quick", "--out", str(tmp_path / "run"), "--set", "training.max_seq_len=8"]) == 2
    err = capsys.readouterr().err
    assert "training.max_seq_len 8 is shorter than the longest train prompt" in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage, needle", [
    (lambda r: (r / "manifest.json").write_text('{"version": 1, "compl'), "manifest.json: not valid JSON"),
    (lambda r: (r / "manifest.json").write_text('{"version": 1}'), "manifest.json: not a restem-ray manifest"),
    (lambda r: ((r / "manifest.json").unlink(), (r / "manifest.json").mkdir()), "manifest.json: Is a directory"),
    (lambda r: (r / "config.yaml").write_text("task: [oops\n"), "config.yaml: not valid YAML"),
    (lambda r: (r / "config.yaml").write_text("- 1\n"), "config.yaml: not a restem-ray config"),
    (lambda r: (r / "config.yaml").unlink(), "config.yaml: missing (a damaged run directory)"),
])
def test_resume_of_a_damaged_run_directory_is_one_line(world, capsys, damage, needle):
    run = world / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"version": 1, "completed": {}}))
    (run / "config.yaml").write_text((world / "cfg.yaml").read_text())
    damage(run)
    before = snapshot(world)
    assert main(["run", str(world / "cfg.yaml"), "--out", str(run), "--resume", "--force"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("restem-ray: error: ") and err.count("\n") == 1 and needle in err, err
    assert snapshot(world) == before


def test_report_skips_a_torn_last_metrics_line_and_names_a_bad_one(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"version": 1, "completed": {"0/eval": 1.0}}))
    line = {"phase": "eval", "iteration": 0, "split": "valid", "pass@1": 0.5, "seconds": 1.0}
    (run / "metrics.jsonl").write_text(json.dumps(line) + "\n" + '{"phase": "eval", "itera')
    assert main(["report", str(run)]) == 0  # a driver killed while appending leaves a torn last line
    assert "0.500" in capsys.readouterr().out
    (run / "metrics.jsonl").write_text(json.dumps({"phase": "eval"}) + "\n" + json.dumps(line) + "\n")
    assert main(["report", str(run)]) == 2
    assert "metrics.jsonl:1: not a metrics line (needs 'iteration' and 'phase')" in capsys.readouterr().err
    (run / "metrics.jsonl").write_bytes(b'{"phase": "eval", "iteration": 0, "x": "\xff"}\n' + json.dumps(line).encode() + b"\n")
    assert main(["report", str(run)]) == 2
    assert "metrics.jsonl:1: not valid JSON" in capsys.readouterr().err
    (run / "metrics.jsonl").write_text(json.dumps(dict(line, iteration=[0])) + "\n" + json.dumps(line) + "\n")
    assert main(["report", str(run)]) == 2
    assert "metrics.jsonl:1: not a metrics line ('iteration' a number or 'control'" in capsys.readouterr().err
    # lines short of a field the table shows: shown as "-", not a KeyError
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in (
        {"phase": "eval", "iteration": 0, "pass@1": 0.25}, {"phase": "generate", "iteration": 1},
        {"phase": "select", "iteration": 1}, {"phase": "improve", "iteration": 1})))
    assert main(["report", str(run)]) == 0
    assert "0.250" in capsys.readouterr().out


def test_output_files_and_counts_are_checked_before_any_work(world, capsys):
    (world / "scores.json").mkdir()
    (world / "graded.jsonl").mkdir()
    cases = [
        (["eval", "--model", str(world / "model"), "--problems", str(world / "valid.jsonl"), "--out",
          str(world / "scores.json")], "--out " + str(world / "scores.json") + ": is a folder"),
        (["verify", "--verifier", "math", "--problems", str(world / "valid.jsonl"), "--samples",
          str(world / "train.jsonl"), "--out", str(world / "graded.jsonl")], "graded.jsonl: is a folder"),
        (["run", str(world / "cfg.yaml"), "--out", ""], "--out: empty path"),
    ]
    before = snapshot(world)
    for args, needle in cases:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err
    for args in (["prompt", str(world / "cfg.yaml"), "--n", "0"],
                 ["eval", "--model", str(world / "model"), "--problems", "x.jsonl", "--max-tokens", "0"]):
        with pytest.raises(SystemExit) as e:  # argparse: usage line, then the error
            main(args)
        assert e.value.code == 2 and "must be a whole number >= 1, got '0'" in capsys.readouterr().err
    assert snapshot(world) == before


def test_a_folder_given_as_config_or_a_path_with_an_equals_sign(world, capsys):
    assert main(["run", str(world), "--out", str(world / "run")]) == 2
    assert f"{world}: is a folder, not a config file" in capsys.readouterr().err
    # /x/lr=1e-3/valid.jsonl is a file (split "valid"), not the split "/x/lr" of file "1e-3/valid.jsonl"
    (world / "lr=1e-3").mkdir()
    (world / "lr=1e-3" / "valid.jsonl").write_text((world / "valid.jsonl").read_text())
    assert main(["eval", "--model", str(world / "model"), "--problems", str(world / "lr=1e-3" / "valid.jsonl"),
                 "--problems", f"valid={world / 'valid.jsonl'}"]) == 2
    err = capsys.readouterr().err
    assert "split name 'valid' given twice" in err and err.count("\n") == 1, err


def test_a_relative_data_path_keeps_its_name_through_links_and_tilde_is_home(world, capsys, monkeypatch):
    """The Hugging Face cache links a snapshot's files to blobs named by their hash, without an extension: a
    relative path was resolved through the link and its type read from the blob's name ("unknown problem file
    type"), where the same path given absolute passed. `~` is the home folder, not a folder named ~."""
    (world / "blobs").mkdir()
    (world / "blobs" / "3f9a2c1e8b7d").write_bytes((world / "train.jsonl").read_bytes())
    (world / "snap").mkdir()
    (world / "snap" / "train.jsonl").symlink_to(world / "blobs" / "3f9a2c1e8b7d")
    edit_config(world, lambda t: t["task"].update(train_file="snap/train.jsonl"))
    assert main(["check", str(world / "cfg.yaml")]) == 0, capsys.readouterr().err
    monkeypatch.setenv("HOME", str(world / "snap"))
    edit_config(world, lambda t: t["task"].update(train_file="~/train.jsonl"))
    assert main(["check", str(world / "cfg.yaml")]) == 0, capsys.readouterr().err


def test_ctrl_c_is_one_line_and_exit_130(world, capsys, monkeypatch):
    import restem_ray.cli as cli

    def interrupted(cfg, *a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "check_inputs", interrupted)
    assert main(["check", str(world / "cfg.yaml")]) == 130
    assert capsys.readouterr().err == "restem-ray: interrupted\n"


def test_a_machine_error_without_a_file_name_is_one_line_and_exit_1(world, capsys, monkeypatch):
    """A full disk while appending to metrics.jsonl raises an OSError that names no file: one line, not a
    traceback; --debug shows where."""
    import errno

    import restem_ray.cli as cli

    def full(cfg, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(cli, "check_inputs", full)
    assert main(["check", str(world / "cfg.yaml")]) == 1
    assert capsys.readouterr().err == "restem-ray: run stopped: No space left on device (--debug shows where)\n"
    with pytest.raises(OSError):
        main(["check", str(world / "cfg.yaml"), "--debug"])


def test_lora_target_modules_that_name_no_module_of_the_model_are_refused_at_check(world, capsys):
    """peft raised NoMatchingPeftModuleError at the first M-step, after a whole E-step; `check` builds the model
    on the meta device (no weights) and names what its modules are called."""
    import torch
    from safetensors.torch import save_file

    (world / "model" / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 512}))
    save_file({"w": torch.zeros(1)}, str(world / "model" / "model.safetensors"))  # (check reads its header)
    check = lambda *s: main(["check", str(world / "cfg.yaml"), "--set", "training.lora_rank=8",  # noqa: E731
                             *[x for kv in s for x in ("--set", kv)]])
    assert check("training.lora_target_modules=[q_proj, nope_proj]") == 2
    err = capsys.readouterr().err
    assert "training.lora_target_modules: ['nope_proj'] name no module of" in err and "q_proj" in err
    assert err.count("\n") == 1
    assert check("training.lora_target_modules=nothing_here") == 2
    assert "'nothing_here' matches no module of" in capsys.readouterr().err
    for ok in ("[q_proj, v_proj]", "'.*layers\\.0\\.mlp\\.down_proj'", "all-linear"):
        assert check(f"training.lora_target_modules={ok}") == 0, capsys.readouterr().err


def test_rows_with_integers_of_thousands_of_digits_or_deep_unused_fields_are_read(world, capsys):
    """Valid JSON that Python's defaults refuse: an answer of 5,000 digits (int parsing stops at 4,300) and a
    field nested deeper than a recursive walk goes (the Unicode check was recursive). Both were tracebacks."""
    from restem_ray.data import load_problems

    big = "9" * 5000
    jsonl_lines(world, [('{"id": 1, "prompt": "q", "answer": ' + big + ', "meta": ' + "[" * 600 + "]" * 600 + "}").encode()])
    assert main(["check", str(world / "cfg.yaml")]) == 0, capsys.readouterr().err
    (row,) = load_problems(world / "train.jsonl")
    assert str(row["answer"]) == big


def test_a_model_with_its_own_code_passes_check_only_with_trust_remote_code(world, capsys):
    """model.trust_remote_code: a folder whose auto_map names its own classes is refused in one line without it;
    with it `check` loads its config and tokenizer by running that code (transformers knows no 'restem_toy')."""
    from helpers import with_own_code

    with_own_code(world / "model", architectures=False)  # (no architectures: a folder without weights, see check_weights)
    assert main(["check", str(world / "cfg.yaml")]) == 2
    err = capsys.readouterr().err
    assert "model type 'restem_toy' comes with its own code (auto_map)" in err and err.count("\n") == 1, err
    assert main(["check", str(world / "cfg.yaml"), "--set", "model.trust_remote_code=true"]) == 0, \
        capsys.readouterr().err


def _edit_auto_map(folder, fn):
    config = json.loads((folder / "config.json").read_text())
    fn(config["auto_map"])
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("damage, needle", [
    (lambda m: (m / "modeling_toy.py").unlink(),
     "config.json auto_map.AutoModelForCausalLM 'modeling_toy.ToyForCausalLM' does not load"),
    (lambda m: (m / "modeling_toy.py").write_text("import no_such_package_xyz\n"),
     "'modeling_toy.ToyForCausalLM' does not load (ImportError: This modeling file requires the following packages that were not "
     "found in your environment: no_such_package_xyz"),
    (lambda m: _edit_auto_map(m, lambda a: a.pop("AutoModelForCausalLM")),
     "model type 'restem_toy' is the folder's own code, but config.json's auto_map names no AutoModelForCausalLM"),
    (lambda m: _edit_auto_map(m, lambda a: a.update(AutoModelForCausalLM="org/repo--modeling_toy.ToyForCausalLM")),
     "names code in another Hub repository, which is not downloaded"),
])
def test_check_loads_a_trusted_model_s_own_code(world, capsys, damage, needle):
    """With model.trust_remote_code, `check` imports the classes the folder's auto_map names, as the M-step will:
    code that is missing, needs a package the machine lacks or lives in another Hub repository fails here in one
    line, not in the first M-step after a whole E-step (vLLM may serve the architecture with its own code)."""
    from helpers import with_own_code

    damage(with_own_code(world / "model", architectures=False))
    assert main(["check", str(world / "cfg.yaml"), "--set", "model.trust_remote_code=true"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("restem-ray: error: model.base: ") and err.count("\n") == 1, err
    assert needle in err, err
