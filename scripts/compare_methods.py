"""Run a bundled example once per method and print trainable parameters, run time and base → tuned metric.

    python scripts/compare_methods.py classify            # MiniLM on the support-ticket task (~1-2 min per method)
    python scripts/compare_methods.py sft --max-steps 20  # SmolLM2 on the order-extraction task (slow on CPU)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from deltatune.config import load_config  # noqa: E402
from deltatune.demo import orders as demo_task  # noqa: E402
from deltatune.demo import routing as classify_task  # noqa: E402
from deltatune.pipeline import run  # noqa: E402

EXAMPLES = {
    # example -> (config, data generator, data folder, metric, {method: overrides})
    "classify": ("configs/classify_minilm.yaml", classify_task, "data/classify", "accuracy",
                 {"full": [], "lora": ["learning_rate=1e-3"],
                  "head_only": ["learning_rate=1e-2", "num_train_epochs=4"]}),
    "sft": ("configs/lora_sft_smollm2.yaml", demo_task, "data/demo", "exact_match",
            {"full": ["learning_rate=1e-4"], "lora": [], "head_only": ["learning_rate=1e-3"]}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("example", choices=sorted(EXAMPLES))
    parser.add_argument("--methods", default="full,lora,head_only")
    parser.add_argument("--max-steps", type=int, default=-1, help="cap the optimizer steps (quick look)")
    args = parser.parse_args()
    config, generator, data_dir, metric, per_method = EXAMPLES[args.example]
    generator.write(REPO / data_dir)
    rows = []
    for method in args.methods.split(","):
        out = REPO / "runs" / f"compare-{args.example}-{method}"
        overrides = [f"output_dir={out}", f"max_steps={args.max_steps}", *per_method[method]]
        cfg = load_config(REPO / config, overrides + [f"method={method}"])
        start = time.perf_counter()
        result = run(cfg)
        seconds = time.perf_counter() - start
        record = next(json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                      if '"event": "method"' in line)
        rows.append((method, record["trainable_parameters"], record["total_parameters"], result.fit.steps,
                     result.fit.wall_seconds, seconds, result.before.get(metric), result.after.get(metric)))
    print(f"\n{args.example}: {metric} base -> tuned")
    print(f"{'method':<10} {'trainable':>12} {'total':>12} {'steps':>6} {'train s':>8} {'run s':>7} "
          f"{'base':>7} {'tuned':>7}")
    for m, t, n, steps, fit_s, run_s, b, a in rows:
        print(f"{m:<10} {t:>12,} {n:>12,} {steps:>6} {fit_s:>8.1f} {run_s:>7.1f} {b:>7.3f} {a:>7.3f}")


if __name__ == "__main__":
    main()
