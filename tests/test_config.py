import subprocess
import sys

import pytest
import yaml

from restem_ray.config import RestemConfig, TrainingConfig, load_config
from restem_ray.errors import UserError

MIN = {"task": {"train_file": "t.jsonl", "valid_file": "v.jsonl"}, "model": {"base": "m"}}


def test_defaults_follow_the_paper():
    c = RestemConfig.model_validate(MIN)
    assert c.sampling.samples_per_problem == 32
    assert c.sampling.temperature == 0.7 and c.sampling.top_k == 40
    assert c.selection.max_solutions_per_problem == 10
    assert c.training.restart_from_base is True
    assert c.loop.iterations == 3
    assert c.training.zero_stage == 2 and c.training.num_workers == 2


def write(tmp_path, tree):
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(tree))
    return p


def test_overrides_and_relative_paths(tmp_path):
    c = load_config(write(tmp_path, MIN), ["sampling.temperature=1.0", "loop.iterations=2",
                                          'sampling.stop=["\\n\\n"]'])
    assert c.sampling.temperature == 1.0 and c.loop.iterations == 2
    assert c.sampling.stop == ["\n\n"]
    assert c.task.train_file == str(tmp_path / "t.jsonl")


def test_paths_given_with_set_are_relative_to_the_current_folder(tmp_path, monkeypatch):
    """A config file's paths are relative to the file; `--set` ones to where the command runs (a relative
    model.base kept as written would make RUN/best, a link inside the run directory, point nowhere)."""
    cfg_dir, cwd = tmp_path / "configs", tmp_path / "work"
    cfg_dir.mkdir()
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    c = load_config(write(cfg_dir, MIN), ["model.base=models/tiny", "task.valid_file=data/v.jsonl",
                                          "model.sampler=s3://bucket/m", "task.extra_eval_files={x: e.jsonl}"])
    assert c.model.base == str(cwd / "models" / "tiny") and c.task.valid_file == str(cwd / "data" / "v.jsonl")
    assert c.model.sampler == "s3://bucket/m" and c.task.extra_eval_files == {"x": str(cwd / "e.jsonl")}
    assert c.task.train_file == str(cfg_dir / "t.jsonl")  # the file's own, relative to the file
    # Ray Train took a relative storage_path as a URI without a scheme and failed at the first M-step
    c = load_config(write(cfg_dir, MIN), ["training.storage_path=ckpts"])
    assert c.training.storage_path == str(cwd / "ckpts")
    assert load_config(write(cfg_dir, MIN), ["training.storage_path=s3://b/p"]).training.storage_path == "s3://b/p"


@pytest.mark.parametrize("override,needle", [
    ("training.lrr=3", "training.lrr: unknown key"),
    ("training.lr=abc", "training.lr: Input should be a valid number"),
    ("sampling.samples_per_problem=0", "sampling.samples_per_problem"),
    ("training.zero_stage=5", "training.zero_stage"),
    ("nonsense", "expected key.path=value"),
    ("evaluation.k_splits=[tset]", "evaluation.k_splits: 'tset' is not an eval split (one of valid, test)"),
    ("sampling.round_size=0", "sampling.round_size"),
    # vLLM refused n > 1 at greedy temperatures at the first generate call, after the engines had loaded
    ("sampling.temperature=0", "sampling.temperature: 0 is greedy decoding, which gives one sample per problem, "
                               "but a problem draws up to 32"),
    ("sampling={temperature: 0, adaptive: true, round_size: 1}", "but a problem draws up to 32"),
    ("evaluation={k: 4, temperature: 0}", "evaluation.temperature: 0 is greedy decoding, which gives one sample per "
                                          "request, but evaluation.k asks for 4"),
    # the replicas reserved no GPU: a CUDA vLLM took GPUs the M-step and other replicas hold
    ("training.use_gpu=true", "sampling.use_gpu: false while training.use_gpu is true"),
    ("sampling.temperature=2.5", "sampling.temperature: Input should be less than or equal to 2"),
    ("evaluation.temperature=3", "evaluation.temperature: Input should be less than or equal to 2"),
    ("sampling.engine_kwargs={tensor_parallel_size: 2}", "sampling.engine_kwargs.tensor_parallel_size is 2 but "
                                                         "sampling.tensor_parallel_size is 1"),
    ("sampling.engine_kwargs={pipeline_parallel_size: 2}", "sampling.engine_kwargs.pipeline_parallel_size: replicas "
                                                           "run tensor parallelism only"),
    ("sampling.engine_kwargs={distributed_executor_backend: ray}",
     "sampling.engine_kwargs.distributed_executor_backend: 'ray' cannot run inside a replica"),
    ("verification.plugin_warmup=rm:load", "verification.plugin_warmup: only a plug-in verifier has one "
                                           "(verifier 'auto')"),
    # NaN passes every range check (NaN < 0 is false) and infinity overflows timers: no float key takes either
    ("task.valid_split=.nan", "task.valid_split: Input should be a finite number (got nan)"),
    ("verification.answer_timeout_s=.inf", "verification.answer_timeout_s: Input should be a finite number"),
    ("verification.answer_timeout_s=1e300", "verification.answer_timeout_s: Input should be less than or equal to 3600"),
    ("training.lr=.inf", "training.lr: Input should be a finite number"),
    ("verification.resources={sandbox: .nan}", "verification.resources.sandbox: Input should be a finite number"),
    ("training.resources_per_worker={x: -1}", "training.resources_per_worker.x: Input should be greater than or equal to 0"),
    # a key of several types names the key and every type it takes, not pydantic's member names
    ("task.valid_split=abc", "task.valid_split: Input should be a valid number, or a valid integer (got 'abc')"),
    ("prompt.chat_template=maybe", "prompt.chat_template: Input should be 'auto', or a valid boolean (got 'maybe')"),
    ("training.deepspeed=5", "training.deepspeed: Input should be a valid dictionary, or a valid string (got 5)"),
    ('sampling.engine_kwargs={tensor_parallel_size: "1"}', "sampling.engine_kwargs.tensor_parallel_size is '1' but"),
    (".training=1", "an empty name in the key path '.training'"),
    ("task.train_file=", "task.train_file: String should have at least 1 character"),
    # DeepSpeed asserted on it at the first M-step's start, after a whole E-step
    ("training.deepspeed={train_batch_size: 999}", "training.deepspeed: train_batch_size is 999 but "
     "training.micro_batch_size x grad_accum x num_workers is 16; set training.micro_batch_size, grad_accum and "
     "num_workers instead"),
    ("training.deepspeed={zero_optimization: {pipeline_loading_checkpoint: true}}",
     "training.deepspeed: zero_optimization.pipeline_loading_checkpoint is not supported"),
])
def test_bad_config_is_one_named_error(tmp_path, override, needle):
    with pytest.raises(UserError) as e:
        load_config(write(tmp_path, MIN), [override])
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_section_and_bad_yaml(tmp_path):
    with pytest.raises(UserError, match="model: required key is missing"):
        load_config(write(tmp_path, {"task": MIN["task"]}))
    p = tmp_path / "bad.yaml"
    p.write_text("task: [unclosed\n")
    with pytest.raises(UserError, match="bad.yaml:.*not valid YAML"):
        load_config(p)


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "restem_ray.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_exits_2_with_one_line_and_writes_nothing(tmp_path):
    cfg = write(tmp_path, {**MIN, "training": {"lr": "fast"}})
    r = run_cli("check", str(cfg), cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "training.lr" in r.stderr
    assert "Traceback" not in r.stderr
    r = run_cli("run", str(write(tmp_path, MIN)), "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode == 2 and "t.jsonl: problem file not found" in r.stderr
    assert not (tmp_path / "run").exists()


def test_training_options_are_checked_at_load_time(tmp_path):
    """DeepSpeed JSON given as a file (relative to the config), and option combinations DeepSpeed rejects."""
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"reduce_bucket_size": 5e7}}')
    c = load_config(write(tmp_path, {**MIN, "training": {"deepspeed": "ds.json", "zero_stage": 3,
                                                         "offload_params": True}}))
    from restem_ray.training import deepspeed_config, worker_config

    ds = deepspeed_config(c.training, world_size=2)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 5e7 and ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu" and ds["train_batch_size"] == 16
    # the workers get the file's contents: on another node its path (the driver's) may not exist
    sent = worker_config(c.training)
    (tmp_path / "ds.json").unlink()
    assert deepspeed_config(TrainingConfig(**sent), world_size=2) == ds
    (tmp_path / "bad.json").write_text('{"zero_optimization": \n  {stage: 3}}')
    for tree, needle in [({"deepspeed": "bad.json"}, "bad.json: line 2: not valid JSON"),
                         ({"deepspeed": "nope.json"}, "nope.json: cannot read"),
                         ({"offload_params": True}, "training.offload_params needs training.zero_stage 3"),
                         ({"liger_kernel": True}, "training.liger_kernel needs training.use_gpu: true"),
                         ({"liger_kernel": True, "use_gpu": True, "zero_stage": 3},
                          "training.liger_kernel needs training.zero_stage 0, 1 or 2"),
                         ({"use_gpu": True, "gpus_per_worker": 0.5}, "training.gpus_per_worker is 0.5: with "
                          "use_gpu every training worker is one DeepSpeed rank on one GPU"),
                         ({"use_gpu": True, "attn_implementation": "flash_attention_2"},
                          "training.attn_implementation flash_attention_2 needs training.dtype: bf16"),
                         ({"compile_layers": True, "zero_stage": 3},
                          "training.compile_layers needs training.zero_stage 0, 1 or 2"),
                         ({"lr_schedule": "linear"}, "training.lr_schedule"),
                         ({"deepspeed": {"zero_optimization": {"stage": 3}}},
                          "training.deepspeed: zero_optimization.stage is 3 but training.zero_stage is 2; set "
                          "training.zero_stage instead"),
                         ({"deepspeed": {"gradient_accumulation_steps": 4}},
                          "gradient_accumulation_steps is 4 but training.grad_accum is 1")]:
        with pytest.raises(UserError) as e:
            load_config(write(tmp_path, {**MIN, "training": tree}))
        assert needle in str(e.value) and "\n" not in str(e.value)


def test_every_config_example_in_the_readme_is_a_valid_config():
    """The README's YAML examples name keys the config tree has, with values it accepts (a renamed key or a
    wrong type in the docs fails here, not on a user's cluster)."""
    import re
    from pathlib import Path

    from restem_ray.config import config_from_dict

    blocks = re.findall(r"```yaml\n(.*?)```", (Path(__file__).parents[1] / "README.md").read_text(), re.S)
    assert len(blocks) >= 4
    for i, block in enumerate(blocks):
        config_from_dict(yaml.safe_load(block), f"README yaml block {i}")


@pytest.mark.parametrize("key", ["seed", "model"])
def test_engine_kwargs_that_restem_ray_sets_itself_are_a_config_error(key):
    """LLM(model=..., seed=..., **engine_kwargs) would fail every replica's start with a TypeError."""
    from restem_ray.config import config_from_dict

    tree = {"task": {"train_file": "t.jsonl", "valid_file": "v.jsonl"}, "model": {"base": "m"}}
    config_from_dict(tree)
    with pytest.raises(UserError, match=f"sampling.engine_kwargs.{key}: set by restem-ray"):
        config_from_dict({**tree, "sampling": {"engine_kwargs": {key: 1}}})


@pytest.mark.parametrize("item, value", [
    ("prompt.template={question}", "{question}"),                 # YAML would read a mapping {question: null}
    ("prompt.template=Solve {question} # show work", "Solve {question} # show work"),  # ... and a comment
    ("prompt.system=# Be brief", "# Be brief"),
    ("prompt.system='quoted: x'", "quoted: x"),                   # quoted YAML: its string
    ("task.train_file=123", "123"),
    ("task.seed_file=null", None),
    ("sampling.temperature=0.5", 0.5),                            # not a text key: YAML's value
    ("sampling.stop=['Q:']", ["Q:"]),
])
def test_set_gives_a_text_key_the_text_as_written(item, value):
    from restem_ray.config import apply_overrides

    key, _, _ = item.partition("=")
    section, name = key.split(".")
    assert apply_overrides({}, [item])[section][name] == value


def test_a_key_given_twice_is_refused_and_an_empty_section_takes_its_defaults(tmp_path):
    """PyYAML keeps the last of two equal keys silently: a second `loop:` section would drop the first's keys.
    A section whose keys are all commented out (`sampling:` alone) is its defaults, and --set fills it."""
    p = tmp_path / "cfg.yaml"
    p.write_text("task:\n  train_file: t.jsonl\n  valid_file: v.jsonl\nmodel:\n  base: m\nloop:\n  iterations: 2\n"
                 "sampling:\n#  temperature: 1.0\nloop:\n  patience: 1\n")
    with pytest.raises(UserError, match=r"cfg.yaml:10: key 'loop' given twice \(lines 6 and 10\)$"):
        load_config(p)
    p.write_text("task:\n  train_file: t.jsonl\n  valid_file: v.jsonl\n  valid_file: w.jsonl\nmodel: {base: m}\n")
    with pytest.raises(UserError, match=r"cfg.yaml:4: key 'valid_file' given twice"):
        load_config(p)
    p.write_text("task:\n  train_file: t.jsonl\n  valid_file: v.jsonl\nmodel:\n  base: m\nsampling:\n"
                 "#  temperature: 1.0\nprompt:\n")
    assert load_config(p).sampling.temperature == 0.7 and load_config(p).prompt is None
    c = load_config(p, ["sampling.temperature=0.5", "prompt.system=Be brief."])
    assert c.sampling.temperature == 0.5 and c.prompt.system == "Be brief."
    # merge keys are no duplicates: a key merged in may be given again (YAML's override)
    p.write_text("base: &d {lr: 0.0001, epochs: 2}\ntask: {train_file: t.jsonl, valid_file: v.jsonl}\n"
                 "model: {base: m}\ntraining:\n  <<: *d\n  epochs: 3\n")
    from restem_ray.config import read_yaml
    assert read_yaml(p)["training"] == {"lr": 0.0001, "epochs": 3}
    # an optional file given empty drops its split, as null does
    assert load_config(write(tmp_path, MIN), ["task.test_file="]).task.test_file is None
