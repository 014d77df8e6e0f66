"""The prompt layer: every problem is rendered once, at load time, into the text the model sees.

    restem-ray prompt CONFIG --n 2        # print what the model gets for the first train problems

`prompt.template` (the row's fields by name) gives the question; `prompt.system`, few-shot exemplars
(`prompt.few_shot`: a file, or the dataset's standard ones) and the model's chat template wrap it. The
rendered text goes into each problem's `prompt`: vLLM samples from it, the samples Parquet stores it and
the M-step trains on it (masked), so the three never disagree. The unrendered text stays in `raw_prompt`
(code rows: `code_prompt`, which the grader builds programs from). With `prompt.train_few_shot: false`,
train rows also carry `train_prompt`, the zero-shot rendering the M-step trains on. No `prompt` section:
prompts are used as the files give them.
"""
from __future__ import annotations

import functools
import json
import random
import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from .config import PromptConfig, RestemConfig
from .datasets import STANDARD_SHOTS, Splits, load_splits, read_rows
from .errors import UserError, first_line

PLAIN_SHOT_FORMAT = "Question: {question}\nAnswer: {answer}"


def load_tokenizer(path: str, what: str = "model.base", trust: bool = False):
    """`path`'s tokenizer, checked; errors name `what` (the key or flag that gave the path). `trust`:
    model.trust_remote_code (a folder whose auto_map names its own tokenizer or config code)."""
    try:
        return _load_tokenizer(path, trust)
    except UserError as e:
        raise UserError(f"{what}: {e}") from None


@functools.lru_cache(maxsize=8)
def _load_tokenizer(path: str, trust: bool = False):
    from transformers import AutoTokenizer

    from .remote import local_model_files

    folder = local_model_files(path)  # a URI: this node's copy of its small files (not the weights)
    try:
        # (a Mistral folder's tekken.json as vLLM's tokenizer_mode "hf" loads it, sampling.tokenizer_mode: not
        # mistral_common's backend, which writes a rendered [INST] as text)
        tok = AutoTokenizer.from_pretrained(folder, mistral_format=False, trust_remote_code=trust)
    except Exception as e:  # a broken or foreign folder: one line, not a transformers traceback
        hint = ("; it ships its own code (auto_map), which runs only with model.trust_remote_code: true"
                if not trust and "trust_remote_code" in str(e) else "")
        raise UserError(f"{path}: cannot load its tokenizer ({first_line(e)}){hint}") from None
    # transformers 5 rebuilds a tokenizer from its tokenizer_class: a byte-level BPE folder that names a
    # SentencePiece class (DeepSeek-R1-Distill-Llama's LlamaTokenizerFast) loads with the wrong pre-tokenizer and
    # loses every space, for vLLM too, and every prompt and training row would be garbled
    try:
        got = tok.decode(tok(ROUND_TRIP, add_special_tokens=False).input_ids, skip_special_tokens=True)
    except Exception as e:
        raise UserError(f"{path}: its tokenizer fails on plain text ({type(e).__name__}: {e})") from None
    if got.strip().lower() != ROUND_TRIP.lower():  # (a lowercasing normalizer is the tokenizer's own choice)
        try:
            name = json.loads(Path(folder, "tokenizer_config.json").read_text()).get("tokenizer_class")
        except (OSError, ValueError, AttributeError):
            name = None
        hint = ("; tokenizer.json holds the whole tokenizer: set tokenizer_class to PreTrainedTokenizerFast there"
                if Path(folder, "tokenizer.json").is_file() and name not in (None, "PreTrainedTokenizerFast") else "")
        raise UserError(f"{path}: its tokenizer does not give back the text it encodes ({ROUND_TRIP!r} "
                        f"-> {got!r}): transformers loaded it as {type(tok).__name__} (tokenizer_class {name} in "
                        f"tokenizer_config.json){hint}")
    return tok


ROUND_TRIP = "Janet's ducks lay 16 eggs per day, and she eats 3."


def load_shots(pc: PromptConfig, dataset: str | None) -> tuple[list[tuple[str, dict]], str | None]:
    """The chosen exemplars as (location, row with question/answer and their aliases), and their text format."""
    if pc.few_shot is None:
        return [], None
    if pc.few_shot == "standard":
        if dataset not in STANDARD_SHOTS:
            raise UserError(f"prompt.few_shot: standard exemplars exist for task.dataset {' and '.join(STANDARD_SHOTS)}"
                            f" (this config: {dataset}); give a JSONL file of question/answer exemplars instead")
        pairs, fmt = STANDARD_SHOTS[dataset]
        shots = [(f"{dataset} standard exemplar {i + 1}", _shot({}, q, a)) for i, (q, a) in enumerate(pairs)]
    else:
        fmt, shots = PLAIN_SHOT_FORMAT, []
        for loc, row in read_rows(pc.few_shot, "exemplar file (prompt.few_shot)"):
            q = next((row[k] for k in ("question", "prompt", "problem") if isinstance(row.get(k), str)), None)
            a = next((row[k] for k in ("solution", "answer") if isinstance(row.get(k), str)), None)
            if not (q and q.strip() and a and a.strip()):
                raise UserError(f"{loc}: an exemplar needs 'question' (or 'prompt') and 'solution' (or 'answer')")
            shots.append((loc, _shot(row, q, a)))
    n = pc.few_shot_n or len(shots)
    if n > len(shots):
        raise UserError(f"prompt.few_shot_n: {n}, but {pc.few_shot} has {len(shots)} exemplars")
    chosen = shots[:n] if pc.few_shot_seed is None else random.Random(pc.few_shot_seed).sample(shots, n)
    return chosen, pc.shot_format or fmt


def _shot(row: dict, question: str, answer: str) -> dict:
    # the template may name the question by any dataset's field name
    return {"question": question, "prompt": question, "problem": question, "text": question, **row, "answer": answer}


def _own_stops(model: str, tokenizer) -> set[int]:
    """The ids besides the tokenizer's EOS that the model's generation_config.json stops on: its authors set the
    stops of their chat format (Llama-3-Instruct, Qwen2.5-Instruct, gpt-oss, whose <|end|> closes a message, not
    the answer), and vLLM applies them already. A base model's file names its EOS alone, or nothing."""
    import os

    from .remote import local_model_files

    try:
        with open(os.path.join(local_model_files(model), "generation_config.json"), encoding="utf-8") as f:
            ids = json.load(f).get("eos_token_id")
    except (OSError, ValueError, AttributeError):  # none (a plain folder), or not a JSON object
        return set()
    if ids is None:
        ids = set()
    elif isinstance(ids, int) and not isinstance(ids, bool):
        ids = {ids}
    elif isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        ids = set(ids)
    else:  # (vLLM and transformers would fail on it at the engine's start)
        raise UserError(f"{os.path.join(model, 'generation_config.json')}: eos_token_id must be a token id or a list "
                        f"of ids (got {ids!r:.60})")
    return ids - {tokenizer.eos_token_id}


def before_field(fmt: str, name: str, filled: bool = False) -> str:
    """The part of format string `fmt` before its field `{name}` (a literal "{{name}}" is text, not the field):
    still a format string, or with `filled` the text as it renders (its literal braces single)."""
    from string import Formatter

    out = []
    for text, field, spec, conv in Formatter().parse(fmt):
        out.append(text if filled else text.replace("{", "{{").replace("}", "}}"))
        if field == name:
            break
        if field is not None:
            out.append(f"{{{field}{'!' + conv if conv else ''}{':' + spec if spec else ''}}}")
    return "".join(out)


class PromptRenderer:
    """Renders problem rows into prompts for one tokenizer; built once per config."""

    def __init__(self, pc: PromptConfig, tokenizer, dataset: str | None = None, model: str = "model.base"):
        self.pc, self.tok = pc, tokenizer
        has = bool(getattr(tokenizer, "chat_template", None))
        if pc.chat_template is True and not has:
            raise UserError(f"prompt.chat_template: true, but the tokenizer of {model} has no chat template")
        self.chat = has if pc.chat_template == "auto" else pc.chat_template
        if pc.chat_template_kwargs and not self.chat:
            raise UserError(f"prompt.chat_template_kwargs: prompts are plain text (prompt.chat_template: "
                            f"{pc.chat_template}{'' if has else f', and {model} has no chat template'}): no template "
                            "reads them")
        self.template_kwargs = dict(pc.chat_template_kwargs)  # what every rendering passes the template
        shots, self.fmt = load_shots(pc, dataset)
        self.shots = [(self._question(row, loc), row["answer"]) for loc, row in shots]
        marker = before_field(self.fmt, "question", filled=True).strip() if self.fmt and not self.chat else ""
        self.stop: tuple[str, ...] = (marker,) if marker else ()  # the next exemplar's question marker
        # Zero-shot plain text in a question/answer format ("Question: {question}\nAnswer:"): a base model answers,
        # then writes the next "Question:" on to max_tokens, and a cut sample is never kept. The question marker
        # stops it, as the few-shot format's does. (Code prompts stop as their datasets' evaluations do instead.)
        lead = re.match(r"\s*([A-Za-z][A-Za-z ]{0,29}:)[ \t]*(?:\n[ \t]*)?\{", pc.template)
        qa = lead and re.search(r"\n[ \t]*[A-Za-z][A-Za-z ]{0,29}:\s*$", pc.template)
        self.template_stop: tuple[str, ...] = (lead.group(1),) if qa and not self.chat and self.fmt is None else ()
        end = self._end_of_turn() if self.chat else None
        own = _own_stops(model, tokenizer)
        self.stop_token_ids: tuple[int, ...] = (end,) if end is not None and not own else ()
        # What a completion that did not end on a stop token id (a human solution, an EOS-ended sample) is trained
        # to end with where sampling.stop_token_ids is empty: the template's end of turn where the model stops on
        # it (Gemma-2-it's <end_of_turn>, Llama-3-Instruct's <|eot_id|>: not the tokenizer's EOS, which the chat
        # format never ends an answer with), not gpt-oss's <|end|>, which closes a message, not the answer.
        self.end_token_id: int | None = end if end is not None and end in own else None
        self._bos_twice: bool | None = None

    def _end_of_turn(self, or_eos: bool = False) -> int | None:
        """The special token the chat template closes an assistant turn with, when it is not the tokenizer's EOS
        (`or_eos`: when it is, too).
        A base model's tokenizer may ship a chat template (Qwen2.5 base: turns end with <|im_end|>, EOS is
        <|endoftext|>, the only id its generation_config stops on): without this token as a stop, vLLM samples
        on past the answer into made-up turns, and the M-step would teach EOS where the template ends a turn."""
        mark = "RESTEM_ANSWER_MARK"
        try:
            turns = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": mark}]
            text = self.tok.apply_chat_template(turns, tokenize=False, **self.template_kwargs)
        except Exception:  # a template that wants other turns: no end-of-turn token found, EOS ends samples
            return None
        if mark not in text:
            return None
        ids = self.tok(text.split(mark, 1)[1].lstrip(), add_special_tokens=False).input_ids
        added = self.tok.added_tokens_decoder.get(ids[0]) if ids else None
        if added is None or not added.special or (ids[0] == self.tok.eos_token_id and not or_eos):
            return None
        if added.content == "<|end|>" and keeps_special_tokens(self.tok):
            # harmony's <|end|> closes a message (the analysis channel's too), not the answer: as a stop it would end
            # every sample after its analysis (a template that closes the last turn with it, Unsloth's gpt-oss one)
            return None
        return ids[0]

    def answer_lead(self) -> str:
        """The whitespace the format puts between a prompt and its answer, which `render` leaves out of the prompt
        (a plain format's "A: {answer}" gives " "; a chat template that writes " " + the content, Mistral's and
        Llama-2's "[/INST] ", too). The model's own samples begin with it; a human solution (a seed row) gets it
        too, so both are trained on the boundary the model meets at inference. Only whitespace: a template that
        writes more there (Qwen3's empty think block) gives "". A zero-shot template ending on a label ("Answer:")
        gives " "; one ending otherwise, "" (the text as written). A harmony template's final-channel header
        (gpt-oss) too."""
        if self.chat:
            mark, user = "RESTEM_ANSWER_MARK", [{"role": "user", "content": "Q"}]
            try:
                head = self.tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True,
                                                    **self.template_kwargs)
                full = self.tok.apply_chat_template(user + [{"role": "assistant", "content": mark}], tokenize=False,
                                                    **self.template_kwargs)
            except Exception:
                return ""
            lead = full[len(head): full.find(mark)] if full.startswith(head) and mark in full else ""
            if lead.startswith(HARMONY) and keeps_special_tokens(self.tok):  # (gpt-oss: its samples open a channel,
                return lead  # "<|channel|>final<|message|>" before a human solution, whose samples say it too)
        elif self.fmt is None:  # a zero-shot template that ends on a label ("...\nAnswer:"): the model's answer
            return " " if self.pc.template.endswith(":") else ""  # begins with a space after it
        else:  # what `render` leaves out: the spaces after the format's last line break
            tail = before_field(self.fmt, "answer", filled=True)
            lead = tail[len(tail.rstrip(" \t")):]
        return lead if lead.isspace() else ""

    def _question(self, row: dict, loc: str = "") -> str:
        try:
            return self.pc.template.format_map(row)
        except KeyError as e:  # rows are checked at load; exemplars are checked here
            raise UserError(f"{loc}: prompt.template uses field {e.args[0]!r}, which this exemplar lacks") from None

    def render(self, row: dict, few_shot: bool = True) -> str:
        q, shots, system = self._question(row), self.shots if few_shot else [], self.pc.system
        if self.chat:
            turns = [{"role": "system", "content": system}] if system else []
            for sq, sa in shots:
                turns += [{"role": "user", "content": sq}, {"role": "assistant", "content": sa}]
            try:
                text = self.tok.apply_chat_template(turns + [{"role": "user", "content": q}], tokenize=False,
                                                    add_generation_prompt=True, **self.template_kwargs)
            except Exception as e:  # e.g. a template that refuses a system turn
                raise UserError(f"prompt: the model's chat template failed ({type(e).__name__}: {e})") from None
            return self._no_double_bos(text)
        if self.fmt is None:
            return "\n\n".join(([system] if system else []) + [q])
        blocks = [self.fmt.format(question=sq, answer=sa) for sq, sa in shots]
        # Spaces before the answer are left to the model (BPE joins a space to the word after it: " 18"), line
        # breaks are not: in the GPT-4-style pre-tokenizers of Qwen and Llama 3, "Solution:\n" is the tokens
        # "Solution", ":\n", and a prompt cut to "Solution:" ends on a ":" that no exemplar's shows
        blocks.append(before_field(self.fmt, "answer").format(question=q).rstrip(" \t"))
        return "\n\n".join(([system] if system else []) + blocks)

    def _no_double_bos(self, text: str) -> str:
        """vLLM and the M-step tokenize with add_special_tokens=True: a template that writes BOS itself would
        get a second one, so the rendered text leaves it out when the tokenizer adds it anyway."""
        bos = self.tok.bos_token
        if not bos or not text.startswith(bos):
            return text
        if self._bos_twice is None:
            ids = self.tok(text).input_ids
            self._bos_twice = len(ids) > 1 and ids[0] == ids[1] == self.tok.bos_token_id
        return text[len(bos):] if self._bos_twice else text


@dataclass
class Task:
    """The problems of one config as everything downstream sees them (rendered when `prompt` is set)."""
    train: list[dict]
    evals: dict[str, list[dict]]
    seed_rows: list[dict] = field(default_factory=list)
    stop: tuple[str, ...] = ()                 # sampling.stop, or the few-shot format's question marker
    renderer: PromptRenderer | None = None
    stop_token_ids: tuple[int, ...] = ()       # sampling.stop_token_ids, or the chat template's end of turn
    split_stop: dict[str, tuple[str, ...]] = field(default_factory=dict)  # eval splits that stop otherwise
    skip_special_tokens: bool = True           # sampling.skip_special_tokens, resolved (keeps_special_tokens)


HARMONY = "<|channel|>"  # gpt-oss's response format: channels (analysis, final) opened by special tokens


def keeps_special_tokens(tok) -> bool:
    """Whether a model's completions are structured by special tokens it writes itself (harmony: gpt-oss), which
    vLLM's default decoding would drop: the M-step would train on the channels' texts run together."""
    return any(t.content == HARMONY and t.special for t in getattr(tok, "added_tokens_decoder", {}).values())


def skip_special_tokens(cfg: RestemConfig, tok) -> bool:
    """sampling.skip_special_tokens, None resolved by the model's tokenizer."""
    s = cfg.sampling.skip_special_tokens
    return (not keeps_special_tokens(tok)) if s is None else s


def template_fields(cfg: RestemConfig) -> tuple[str, ...]:
    return tuple(cfg.prompt.template_fields()) if cfg.prompt else ()


def make_renderer(cfg: RestemConfig, model: str | None = None, what: str = "model.base") -> PromptRenderer | None:
    """`what`: the key or flag that gave `model` (errors name it)."""
    if cfg.prompt is None:
        return None
    model = model or cfg.model.base
    return PromptRenderer(cfg.prompt, load_tokenizer(model, what, cfg.model.trust_remote_code), cfg.task.dataset, model)


def render_rows(rows: list[dict], renderer: PromptRenderer | None, *, code: bool, train: bool = False) -> list[dict]:
    """Rows with `prompt` rendered; `raw_prompt`, code rows' `code_prompt` and (train) `train_prompt` added."""
    if renderer is None:
        return rows
    out = []
    for r in rows:
        new = dict(r, prompt=renderer.render(r), raw_prompt=r["prompt"])
        if code and not new.get("code_prompt"):
            new["code_prompt"] = r["prompt"]
        if train and not renderer.pc.train_few_shot and renderer.shots:
            new["train_prompt"] = renderer.render(r, few_shot=False)
        out.append(new)
    return out


def render_task(cfg: RestemConfig, splits: Splits, model: str | None = None) -> Task:
    renderer = make_renderer(cfg, model)
    code = cfg.task.kind == "code"
    train = render_rows(splits.train, renderer, code=code, train=True)
    if cfg.task.leave_out_long_prompts:
        train = fitting_prompts(cfg, train, renderer.tok if renderer else load_tokenizer(
            model or cfg.model.base, trust=cfg.model.trust_remote_code))
    evals = {n: render_rows(rows, renderer, code=code) for n, rows in splits.evals.items()}
    tok = renderer.tok if renderer else (load_tokenizer(model or cfg.model.base, trust=cfg.model.trust_remote_code)
                                         if cfg.sampling.skip_special_tokens is None else None)
    seed = splits.seed_rows
    if renderer is not None:  # human solutions are trained on like samples: under the training rendering, after
        lead = renderer.answer_lead()  # the space or line the format puts before an answer (as samples begin)
        seed = [dict(r, prompt=renderer.render(r, few_shot=cfg.prompt.train_few_shot), raw_prompt=r["prompt"],
                     solution=r["solution"] if r["solution"][:1].isspace() else lead + r["solution"]) for r in seed]
    stop, stop_token_ids = sampling_stops(cfg, renderer)
    if model is None and cfg.model.sampler and renderer is not None and renderer.chat and not cfg.sampling.stop_token_ids:
        stop_token_ids = _sampler_stop(cfg.model.sampler, renderer, stop_token_ids, cfg.model.trust_remote_code)
    return Task(train, evals, seed, stop, renderer, stop_token_ids, split_stops(cfg, renderer, stop),
                skip_special_tokens(cfg, tok))


def _sampler_stop(sampler: str, renderer: PromptRenderer, ids: tuple[int, ...], trust: bool = False) -> tuple[int, ...]:
    """model.sampler samples the E-step and stops on its own EOS and generation_config ids: the chat template's end
    of turn, where model.base (an instruct model) stops on it itself, is added for a sampler that does not (a base
    model of the same chat format, whose EOS is <|endoftext|>: it would write further turns to max_tokens)."""
    end = renderer._end_of_turn(or_eos=True)
    if end is None or end in ids:
        return ids
    tok = load_tokenizer(sampler, "model.sampler", trust)
    return ids if end in _own_stops(sampler, tok) | {tok.eos_token_id} else (*ids, end)


def load_task(cfg: RestemConfig, model: str | None = None) -> Task:
    """Every problem of `cfg`: read, adapted, split, rendered."""
    return render_task(cfg, load_splits(cfg.task, need=template_fields(cfg)), model)


# A plain-text code prompt (no chat template) has a base model continue the file past its answer, to max_tokens:
# each sample then ends "length" (not kept) and is cut mid-line (a SyntaxError graded wrong). The code datasets'
# own evaluations stop at the next top-level statement: HumanEval's (Chen et al. 2021), MBPP's (the bigcode
# harness, for this docstring prompt), APPS's next question.
CODE_STOPS = {"humaneval": ("\nclass", "\ndef", "\n#", "\nif", "\nprint"),
              "mbpp": ("\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n```"),
              "apps": ("\nQUESTION:",)}


def stop_source(cfg: RestemConfig, renderer: PromptRenderer | None) -> str:
    """Where the implied stop strings come from, for messages."""
    if renderer and renderer.stop:
        return "from the few-shot format"
    if CODE_STOPS.get(cfg.task.dataset or ""):
        return f"of {cfg.task.dataset}'s code prompts"
    return "from the prompt template's question marker"


def implied_stops(renderer: PromptRenderer | None, dataset: str | None) -> tuple[str, ...]:
    """The stop strings `dataset`'s prompts imply when `sampling.stop` is not given: the few-shot format's
    question marker; a chat template's none (its end-of-turn token stops); else, for plain-text code prompts, the
    stops of the code dataset's own evaluation; else the question marker a zero-shot template opens with."""
    if renderer and (renderer.stop or renderer.chat):
        return renderer.stop
    return CODE_STOPS.get(dataset or "", ()) or (renderer.template_stop if renderer else ())


def sampling_stops(cfg: RestemConfig, renderer: PromptRenderer | None) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The stop strings and stop token ids samples end on: `sampling.stop` and `sampling.stop_token_ids` where
    given, else what the prompts imply (implied_stops; the chat template's end of turn)."""
    s = cfg.sampling
    return (tuple(s.stop) or implied_stops(renderer, cfg.task.dataset),
            tuple(s.stop_token_ids) or (renderer.stop_token_ids if renderer else ()))


def split_stops(cfg: RestemConfig, renderer: PromptRenderer | None, stop: tuple[str, ...]) -> dict[str, tuple]:
    """The eval splits that stop otherwise than the run (`stop`): `sampling.split_stop` where given, else a
    split in another released format (task.eval_datasets) stops as that dataset's prompts imply (an MBPP split
    beside HumanEval train would otherwise be cut at "\\ndef", after an answer's imports). `sampling.stop`, given
    by the user, applies to every split."""
    s = cfg.sampling
    if s.split_stop is not None:
        return {n: tuple(v) for n, v in s.split_stop.items() if tuple(v) != stop}
    if s.stop:
        return {}
    own = {n: implied_stops(renderer, d) for n, d in cfg.task.eval_datasets.items() if d}
    return {n: v for n, v in own.items() if v != stop}


def with_stop(cfg: RestemConfig, task: Task) -> RestemConfig:
    """`cfg` with the stops its prompts imply (written to the run's config.yaml as run: a resume samples with them)."""
    s = cfg.sampling
    split = {n: list(v) for n, v in task.split_stop.items()} or None
    if (tuple(s.stop), tuple(s.stop_token_ids), s.split_stop or None) == (task.stop, task.stop_token_ids, split):
        return cfg
    return cfg.model_copy(update={"sampling": s.model_copy(update={"stop": list(task.stop),
                                                                   "stop_token_ids": list(task.stop_token_ids),
                                                                   "split_stop": split})})


def check_lengths(cfg: RestemConfig, task: Task) -> None:
    """Refuse a training.max_seq_len that the longest train prompt plus a full completion overflows, an engine
    max_model_len that a prompt alone overflows (vLLM would fail that request mid-run), and a stop token id
    the tokenizer lacks."""
    for split, rows in {"train": task.train, **task.evals}.items():  # (vLLM refuses an empty prompt mid-run)
        empty = next((r["id"] for r in rows if not r["prompt"].strip() or not r.get("train_prompt", "x").strip()), None)
        if empty is not None:
            raise UserError(f"{split} problem {empty!r}: its rendered prompt is empty (prompt.template "
                            f"{cfg.prompt.template if cfg.prompt else None!r}, the chat template); see `restem-ray prompt`")
    tok = load_tokenizer(cfg.model.base, trust=cfg.model.trust_remote_code)
    m = cfg.sampling.max_tokens
    pid, longest = _longest(tok, [(r["id"], r.get("train_prompt", r["prompt"])) for r in task.train])
    if longest + m > cfg.training.max_seq_len:
        raise UserError(f"training.max_seq_len {cfg.training.max_seq_len} is shorter than the longest train prompt "
                        f"({longest} tokens, problem {pid!r}) + sampling.max_tokens {m} = {longest + m}: raise "
                        "training.max_seq_len, lower sampling.max_tokens, or leave such problems out "
                        "(task.leave_out_long_prompts: true)")
    # the E-step samples train prompts from model.sampler when set; evaluation always samples the policy (base)
    check_model_len(cfg, {"train": task.train}, tok, cfg.model.sampler or cfg.model.base, refuse_long={"train"})
    check_model_len(cfg, task.evals, tok, cfg.model.base)
    warn_double_bos(task, tok, cfg.model.base)
    check_sampler(cfg, task)
    for i in cfg.sampling.stop_token_ids:  # past the vocabulary it would end every training row: a crash on GPUs
        if i >= len(tok):
            raise UserError(f"sampling.stop_token_ids: {i} is not a token of {cfg.model.base}'s tokenizer "
                            f"({len(tok)} tokens)")


def warn_double_bos(task: Task, tok, model: str) -> None:
    """Prompts a file holds already rendered (apply_chat_template's text: Llama-3's starts <|begin_of_text|>),
    without a prompt section, keep their BOS, and vLLM and the M-step tokenize with the BOS added again: the model
    then sees two. (A prompt section leaves the rendered BOS out where the tokenizer adds one.)"""
    bos = tok.bos_token
    first = task.train[0]["prompt"] if task.renderer is None and task.train else None
    if not (bos and first and first.startswith(bos)):
        return
    ids = tok(first).input_ids
    if len(ids) > 1 and ids[0] == ids[1] == tok.bos_token_id:
        print(f"[restem] warning: train prompts begin with {bos}, and {model}'s tokenizer adds one too: vLLM and "
              f"the M-step would see it twice; drop it from the prompts", flush=True)


def check_sampler(cfg: RestemConfig, task: Task) -> None:
    """Prompts are rendered once, with model.base's tokenizer (its chat template, its end-of-turn stop id): a
    model.sampler that reads them otherwise (another chat format: Llama-3 given ChatML as plain text; another
    vocabulary: a stop id that is some other token) would sample garbage. Refuse it; a plain-text prompt
    (prompt.chat_template: false) and stop strings suit any sampler."""
    sampler = cfg.model.sampler
    if sampler is None or (task.renderer is None and not task.stop_token_ids):
        return
    trust = cfg.model.trust_remote_code
    base_tok, tok = load_tokenizer(cfg.model.base, trust=trust), load_tokenizer(sampler, "model.sampler", trust)
    for i in task.stop_token_ids:
        ours = base_tok.convert_ids_to_tokens(i)
        theirs = tok.convert_ids_to_tokens(i) if i < len(tok) else None
        if ours != theirs:
            raise UserError(f"model.sampler: {sampler}: stop token id {i} is {theirs!r} in its tokenizer but {ours!r} "
                            f"in model.base's; set sampling.stop_token_ids for the sampler, or use a sampler of the "
                            "base's vocabulary")
    if task.renderer is not None and task.renderer.chat:
        probe = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
                 {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]

        def shape(t):
            """The rendered probe's special tokens in order (its turn structure; a date a template writes, as
            Llama-3.2's does, may differ), or the whole text where the template writes none."""
            try:
                text = t.apply_chat_template(probe, tokenize=False, add_generation_prompt=True,
                                             **task.renderer.template_kwargs)
            except Exception as e:
                return f"(fails: {type(e).__name__})"
            specials = {x for x in t.all_special_tokens} | {a.content for a in t.added_tokens_decoder.values() if a.special}
            found = re.findall("|".join(re.escape(x) for x in sorted(specials, key=len, reverse=True)), text) \
                if specials else []
            return found or text
        if not getattr(tok, "chat_template", None) or shape(tok) != shape(base_tok):
            raise UserError(f"model.sampler: {sampler}: its chat template renders a conversation differently from "
                            f"model.base's, with which every prompt is rendered; use a sampler of the base's chat "
                            "format, or plain-text prompts (prompt.chat_template: false)")


def engine_limit(cfg: RestemConfig, model: str | None = None) -> tuple[int | None, str]:
    """The most tokens vLLM gives a sequence, prompt included, and where that limit comes from:
    engine_kwargs.max_model_len, else the model's own context as vLLM derives it (`_context_length`, when its
    config does not scale RoPE: vLLM then derives a longer one itself); None when neither is known."""
    kwargs = cfg.sampling.engine_kwargs
    limit = kwargs.get("max_model_len")
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
        return limit, "sampling.engine_kwargs.max_model_len"
    # -1 (vLLM's auto-fit): the derived context, which the engine may then lower to fit the memory it finds
    model = model or cfg.model.sampler or cfg.model.base
    return (_context_length(model, bool(kwargs.get("disable_sliding_window")), cfg.model.trust_remote_code),
            f"the context of {model}")


def check_model_len(cfg: RestemConfig, splits: dict[str, list[dict]], tok, model: str | None = None,
                    refuse_long: set[str] = frozenset()) -> None:
    """vLLM ends every sample at max_model_len tokens, prompt included (finish_reason "length"), and fails the
    request of a prompt that fills it. A prompt that fills it is refused, in any split. One that leaves less than
    sampling.max_tokens is refused in train, where every such sample would be cut short, counted truncated and
    never kept (task.leave_out_long_prompts leaves those problems out instead); in an eval split, which keeps
    every problem, it is a warning with the count: its samples may end early. `refuse_long`: the splits that are
    train splits (`eval` scores any file, whatever its name: it refuses none)."""
    limit, source = engine_limit(cfg, model)
    if limit is None:
        return
    m = cfg.sampling.max_tokens
    for name, rows in splits.items():
        lengths = _lengths(tok, [r["prompt"] for r in rows])
        if not lengths:
            continue
        i = max(range(len(rows)), key=lengths.__getitem__)
        longest, pid = lengths[i], f"{name} problem {rows[i]['id']!r}"
        if longest >= limit:
            raise UserError(f"{source} ({limit} tokens) leaves no room after the longest prompt ({longest} tokens, "
                            f"{pid}): raise it (up to the model's context) or shorten the prompt")
        if longest + m <= limit:
            continue
        if name in refuse_long:
            raise UserError(f"{source} ({limit} tokens) is shorter than the longest prompt ({longest} tokens, {pid}) "
                            f"+ sampling.max_tokens {m} = {longest + m}: vLLM would cut its samples short. Raise "
                            "max_model_len (up to the model's context), lower sampling.max_tokens, or leave such "
                            "problems out (task.leave_out_long_prompts: true)")
        n = sum(x + m > limit for x in lengths)
        print(f"[restem] warning: {n} of the {len(rows)} {name} prompts leave fewer than sampling.max_tokens {m} "
              f"tokens within {source} ({limit}); their samples may end early (the longest: {longest} tokens, "
              f"{pid})", flush=True)


# The config keys vLLM takes a model's context from, the smallest found (vllm 0.32 derive_max_model_len_and_key)
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
                 "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len")


def _context_length(model: str, no_sliding_window: bool = False, trust: bool = False) -> int | None:
    """The context vLLM gives a model without max_model_len, where it takes it from the config as it is (no RoPE
    scaling): the smallest of its length keys (a `model_max_length` there wins); with `disable_sliding_window`,
    at most the model's sliding window. (tokenizer_config.json's `model_max_length` is not a limit: vLLM reads it
    for pooling models only, and DeepSeek-R1-Distill-Qwen's 16,384 is below its 131,072 context.)"""
    from .remote import local_model_files

    try:
        folder = Path(local_model_files(model))
        with open(folder / "config.json", encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    config = config.get("text_config") or config if isinstance(config, dict) else {}
    if not isinstance(config, dict):
        return None
    rope = config.get("rope_parameters")
    if config.get("rope_scaling") or (isinstance(rope, dict) and rope.get("factor")):
        return None
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0  # noqa: E731
    found = [config[k] for k in _CONTEXT_KEYS if number(config.get(k))]
    if not found:  # (vLLM assumes 2048 and warns; a config without one is not a released model's)
        return None
    n = config["model_max_length"] if number(config.get("model_max_length")) else min(found)
    if no_sliding_window:
        try:  # (as transformers reads it: Qwen2's is None unless use_sliding_window)
            from transformers import AutoConfig

            window = AutoConfig.from_pretrained(folder, trust_remote_code=trust).get_text_config().sliding_window
        except Exception:
            window = None
        n = min(n, window) if number(window) else n
    return int(n)


_LENGTHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {text: tokens}


def _lengths(tok, texts: list[str]) -> list[int]:
    """Token counts of `texts`, each text tokenized once per tokenizer: the start-up checks (check_lengths,
    check_model_len, fitting_prompts) read the same train prompts."""
    known = _LENGTHS.setdefault(tok, {})
    new = list(dict.fromkeys(t for t in texts if t not in known))
    for i in range(0, len(new), 1024):
        known.update(zip(new[i : i + 1024], map(len, tok(new[i : i + 1024]).input_ids)))
    return [known[t] for t in texts]


def _longest(tok, rows: list[tuple[str, str]]) -> tuple[str, int]:
    return max(zip((pid for pid, _ in rows), _lengths(tok, [t for _, t in rows])), key=lambda x: x[1],
               default=("", 0))


def fitting_prompts(cfg: RestemConfig, train: list[dict], tok) -> list[dict]:
    """task.leave_out_long_prompts: the train problems whose prompt leaves a full completion room in
    training.max_seq_len (check_lengths' rule), the others left out on one line."""
    room = cfg.training.max_seq_len - cfg.sampling.max_tokens
    limit, _ = engine_limit(cfg)  # ... and the sampling prompt leaves a full completion room in vLLM's
    fits = [n <= room for n in _lengths(tok, [r.get("train_prompt", r["prompt"]) for r in train])]
    if limit is not None:
        fits = [f and n + cfg.sampling.max_tokens <= limit for f, n in zip(fits, _lengths(tok, [r["prompt"] for r in train]))]
    kept = [r for r, f in zip(train, fits) if f]
    rule = (f"training.max_seq_len {cfg.training.max_seq_len} - sampling.max_tokens {cfg.sampling.max_tokens} = "
            f"{room} tokens" + (f", or whose sampling prompt leaves less than sampling.max_tokens within "
                                f"max_model_len {limit}" if limit is not None else ""))
    if not kept:
        raise UserError(f"task.leave_out_long_prompts: every train prompt is longer than {rule}")
    if len(kept) < len(train):
        print(f"[restem] {cfg.task.train_file}: left out {len(train) - len(kept)} of {len(train)} train problems "
              f"whose prompt is longer than {rule} (task.leave_out_long_prompts)", flush=True)
    return kept
