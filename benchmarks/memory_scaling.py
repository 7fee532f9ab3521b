"""Host memory and step time of LoRA training as the backbone grows: ours vs PEFT, five backbone setups.

Backbones: Llama-architecture models built from configs with random weights (``random_llama.SHAPES``, no
download), saved once under ``--cache`` in fp32 and in bf16. Setups (``SETUPS``): fp32 base; bf16 base; bf16 +
activation checkpointing; nf4 (bitsandbytes, double quantisation) + checkpointing; fp32 + checkpointing (what
checkpointing saves, without bf16's slow CPU matmuls). On this CPU the nf4 rows compute
in fp32 (this AVX2 CPU has no bf16 matrix support: bf16 matmuls run 5-80x slower than fp32, by shape; on a GPU
one would compute in bf16).

Each measurement runs in a fresh subprocess (this script with ``--child``), so peaks do not mix: it builds one
contender (ours: ``LoRAModule``; PEFT: ``from_pretrained`` + ``gradient_checkpointing_enable(use_reentrant=False)``
+ ``get_peft_model``, same LoRA r=16 on all linear layers, same quantisation config), creates AdamW, resets the
kernel's RSS high-water mark (``common.reset_peak_rss``), runs ``--steps`` training steps on the same random batch
and reports the high-water mark (weights + activations + gradients + optimiser state + the Python process) and the
wall time of the last step. Ours and PEFT run one after the other for each row, the order flipped every row, so
load drift on a shared machine hits both alike; the time column is their ratio.

A memory model ``peak = a·params + b·tokens·layers·hidden + c`` is fitted per setup and side
(least squares over the measured rows; its leave-one-out error is printed with it) and evaluated for 7B-70B models.
A setup measured only at short sequences (bf16 here) borrows b from the fp32 setup with the same checkpointing
(``PER_TOKEN_FROM``): fp32 activations are at least bf16's, so its per-token prediction errs high, within the source
fit's error.

The committed results (``memory_scaling.md`` is the merge of the three runs; bf16 training steps at 2 x 512 tokens
took over 8 minutes at 135M here, so bf16 rows stay at 16-32 tokens):

    python benchmarks/memory_scaling.py --sizes 135M 0.5B 1.5B --tokens 2x512 --extra-tokens 135M:2x128 0.5B:2x128 \
        --setups fp32 'nf4 + ckpt' --steps 1 --name memory_scaling_2x512
    python benchmarks/memory_scaling.py --sizes 135M 0.5B 1.5B --tokens 2x512 --extra-tokens 135M:2x128 0.5B:2x128 \
        --setups 'fp32 + ckpt' --steps 1 --name memory_scaling_ckpt
    python benchmarks/memory_scaling.py --sizes 135M 0.5B --tokens 1x16 --extra-tokens 135M:1x32 \
        --setups bf16 'bf16 + ckpt' --steps 1 --name memory_scaling_bf16
    python benchmarks/memory_scaling.py --merge benchmarks/results/memory_scaling_2x512.json \
        benchmarks/results/memory_scaling_ckpt.json benchmarks/results/memory_scaling_bf16.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from common import (environment, load_average, markdown_table, peak_rss_mb, probe_in_subprocess, reset_peak_rss,
                    rss_mb, write_results)
from random_llama import SHAPES, VOCAB, Setup, parameter_count, save_random_backbone

SETUPS = {s.name: s for s in (
    Setup("fp32", "float32", False),
    Setup("fp32 + ckpt", "float32", True),
    Setup("bf16", "bfloat16", False),
    Setup("bf16 + ckpt", "bfloat16", True),
    Setup("nf4 + ckpt", "float32", True, "nf4"),
)}
SIDES = ("ours", "peft")
# A bf16 setup measured only at short sequences (bf16 steps are too slow on this CPU) borrows the per-token term of
# the fp32 setup with the same checkpointing: fp32 activations are at least bf16's (a bf16 base keeps bf16 hidden
# states; adapter inputs and the loss's logits are fp32 in both), so the borrowed term errs on the high side, within
# the source fit's own error.
PER_TOKEN_FROM = {"bf16": "fp32", "bf16 + ckpt": "fp32 + ckpt"}
MIN_FITTED_TOKENS = 256  # a per-token term is fitted only from rows that reach this many tokens

# (params, layers, hidden) of the paper-scale models the fitted model is evaluated for
TARGET_MODELS = {
    "Qwen2.5-7B": (7.62e9, 28, 3584),
    "Llama-3.1-8B": (8.03e9, 32, 4096),
    "Qwen2.5-32B": (32.76e9, 64, 5120),
    "Llama-3.1-70B": (70.55e9, 80, 8192),
}


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One contender in this fresh process: build, one reset of the RSS peak, ``steps`` training steps."""
    import torch

    import lora_lightning.modules  # noqa: F401  both contenders' processes import Lightning (same baseline)
    from random_llama import build_ours, build_peft, random_batch, training_step

    torch.manual_seed(0)
    setup = SETUPS[spec["setup"]]
    model = (build_ours if spec["side"] == "ours" else build_peft)(Path(spec["folder"]), setup)
    step = training_step(spec["side"], model)
    batch = random_batch(spec["batch"], spec["block"])
    loaded = rss_mb()
    reset_peak_rss()
    times, losses = [], []
    for _ in range(spec["steps"]):
        start = time.perf_counter()
        losses.append(step(batch))
        times.append(time.perf_counter() - start)
    return {"peak_rss_mib": peak_rss_mb(), "loaded_rss_mib": loaded, "step_s": times, "losses": losses}


FEATURES = ("params", "activations", "constant")


def features(params: float, tokens: int, layers: int, hidden: int) -> list[float]:
    """The memory model's inputs: parameters and activation elements (tokens·layers·hidden: a token's per-layer
    activations scale with the width). The logits (tokens·vocab) are in the per-token term at the measured
    vocabulary; a separate term for them was tried and over-fitted 5 rows (leave-one-out error 23-40 %)."""
    return [params, tokens * layers * hidden, 1.0]


def design(rows: list[dict[str, Any]]) -> np.ndarray:
    """The measured rows' model inputs, one row of :func:`features` each."""
    return np.array([features(r["params"], r["tokens"], r["layers"], r["hidden"]) for r in rows])


def least_squares(rows: list[dict[str, Any]], per_token: float | None = None) -> np.ndarray:
    """Coefficients (MiB per feature) of the memory model over ``rows``; with ``per_token`` (b) given, only a and c
    are fitted, on the peaks less that per-token term."""
    x = design(rows)
    y = np.array([r["peak_rss_mib"] for r in rows])
    if per_token is None:
        return np.linalg.lstsq(x, y, rcond=None)[0]
    (a, c), *_ = np.linalg.lstsq(x[:, [0, 2]], y - x[:, 1] * per_token, rcond=None)
    return np.array([a, per_token, c])


def predict_mib(coef: np.ndarray, row: dict[str, Any]) -> float:
    return float(np.dot(coef, design([row])[0]))


def identifiable(rows: list[dict[str, Any]], per_token: float | None) -> bool:
    """Whether ``rows`` determine the model's free terms (all three, or a and c alone when ``per_token`` is given):
    the rows' features have full rank in those columns (3 points of different size or tokens; 2 sizes)."""
    if not rows:
        return False
    x = design(rows)
    x = x / np.abs(x).max(axis=0)  # scale the columns: the rank test must not see magnitudes of 1e9 against 1
    columns = [0, 1, 2] if per_token is None else [0, 2]
    return int(np.linalg.matrix_rank(x[:, columns], tol=1e-9)) == len(columns)


def fit_memory_model(rows: list[dict[str, Any]], per_token: float | None = None) -> dict[str, Any] | None:
    """Least squares ``peak_mib = a·params + b·tokens·layers·hidden + c`` over ``rows``: all three terms when the
    rows determine them and reach ``MIN_FITTED_TOKENS``, else a and c alone with b = ``per_token`` taken from another
    setup's
    fit (None if that is not possible either). Its error is reported on the rows it was fitted to
    (``max_abs_error``) and leave-one-out (``max_loo_error``: each row predicted by the fit to the others, over the
    rows whose removal leaves the fit determined; None if there is none), the honest one with so few rows."""
    if identifiable(rows, None) and max(r["tokens"] for r in rows) >= MIN_FITTED_TOKENS:
        per_token = None
    elif per_token is None or not identifiable(rows, per_token):
        return None
    coef = least_squares(rows, per_token)
    errors = [predict_mib(coef, r) / r["peak_rss_mib"] - 1 for r in rows]
    loo = [predict_mib(least_squares(others, per_token), r) / r["peak_rss_mib"] - 1
           for i, r in enumerate(rows) if identifiable(others := rows[:i] + rows[i + 1:], per_token)]
    return {"bytes_per_param": coef[0] * 2**20, "bytes_per_activation": coef[1] * 2**20, "constant_mib": coef[2],
            "coef_mib": coef.tolist(),
            "per_token_from": None if per_token is None else "another setup", "max_abs_error": float(np.abs(errors).max()),
            "errors": errors, "max_loo_error": float(np.abs(loo).max()) if loo else None, "loo_errors": loo}


def predict_gib(fit: dict[str, Any], params: float, tokens: int, layers: int, hidden: int) -> float:
    return float(np.dot(fit["coef_mib"], features(params, tokens, layers, hidden))) / 1024


def parse_tokens(text: str) -> tuple[int, int]:
    batch, block = text.lower().split("x")
    return int(batch), int(block)


def report(rows: list[dict[str, Any]], args: argparse.Namespace, predict_tokens: list[tuple[int, int]]) -> None:
    """Write the table of measured rows, the fits and the predictions (called after every measured pair)."""
    measured = {(r["size"], r["tokens"], r["setup"], r["side"]): r for r in rows}
    table = []
    for (size, tokens, setup, side), row in measured.items():
        if side != "ours" or (size, tokens, setup, "peft") not in measured:
            continue
        peft = measured[(size, tokens, setup, "peft")]
        table.append([size, f"{row['params'] / 1e6:.0f}M", str(tokens), setup, round(row["peak_rss_mib"]),
                      round(peft["peak_rss_mib"]), f"{row['peak_rss_mib'] / peft['peak_rss_mib']:.3f}",
                      f"{row['step_s'][-1]:.1f}", f"{peft['step_s'][-1]:.1f}",
                      f"{row['step_s'][-1] / peft['step_s'][-1]:.2f}", str(row["load"])])
    fits = {}
    for setup in sorted(SETUPS, key=lambda name: name in PER_TOKEN_FROM):  # references first
        for side in SIDES:
            reference = fits.get(f"{PER_TOKEN_FROM.get(setup)} / {side}")
            per_token = None if reference is None else reference["coef_mib"][1]
            fit = fit_memory_model([r for r in rows if r["setup"] == setup and r["side"] == side], per_token)
            if fit is not None and fit["per_token_from"]:
                fit["per_token_from"] = PER_TOKEN_FROM[setup]
            fits[f"{setup} / {side}"] = fit
    fit_rows, prediction_rows = [], []
    for name, fit in fits.items():
        if fit is None:
            continue
        borrowed = f" (borrowed from {fit['per_token_from']})" if fit["per_token_from"] else ""
        fit_rows.append([name, f"{fit['bytes_per_param']:.2f}", f"{fit['bytes_per_activation']:.2f}{borrowed}",
                         f"{fit['constant_mib']:.0f}",
                         f"{100 * fit['max_abs_error']:.1f} %",
                         "n/a" if fit["max_loo_error"] is None else f"{100 * fit['max_loo_error']:.1f} %"])
        for batch, block in predict_tokens:
            prediction_rows.append([name, f"{batch}x{block}", *(
                f"{predict_gib(fit, params, batch * block, layers, hidden):.1f}"
                for params, layers, hidden in TARGET_MODELS.values())])
    markdown = "\n\n".join([
        "# Memory scaling: ours vs PEFT (CPU host memory)",
        f"Random-weight Llama-architecture backbones, LoRA r={16} on all linear layers, AdamW, "
        f"{'/'.join(sorted({str(len(r['step_s'])) for r in rows}))} training step(s) per fresh process; peak = RSS high-water mark of the steps (weights + activations + "
        "gradients + optimiser state + the Python process). nf4 rows compute in fp32 on this CPU. Time: wall "
        "seconds of the last step; ours and PEFT measured back to back (order flipped per row) on a shared 2-core "
        "machine, load average in the last column: read the ratio, not the seconds.",
        markdown_table(["size", "params", "tokens", "setup", "ours peak MiB", "PEFT peak MiB", "ours/PEFT mem",
                        "ours step s", "PEFT step s", "ours/PEFT time", "load (1 min)"], table, align="lllllrrrrrrl"),
        "## Memory model: peak = a·params + b·(tokens·layers·hidden) + c",
        markdown_table(["setup / side", "a (bytes/param)", "b (bytes/activation element)", "c (MiB)", "max error, fitted rows", "max error, leave-one-out"], fit_rows)
        if fit_rows else "Too few (size, tokens) points per setup: no fit.",
        "## Predicted peak (GiB) at paper scale",
        markdown_table(["setup / side", "tokens", *TARGET_MODELS], prediction_rows) if prediction_rows else "–",
    ])
    write_results(args.name, {"rows": rows, "fits": fits, "target_models": TARGET_MODELS}, markdown)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", nargs="+", default=["135M", "360M", "0.5B"], choices=list(SHAPES))
    parser.add_argument("--tokens", default="1x256", help="batch x block of every row")
    parser.add_argument("--extra-tokens", nargs="*", default=["135M:1x128"], metavar="SIZE:BxT",
                        help="extra rows at another batch x block (identify the per-token term)")
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--predict-tokens", nargs="+", default=["2x512", "4x2048"])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/lora_lightning_random_llama"))
    parser.add_argument("--name", default="memory_scaling")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                        help="report the rows of these result files together (one table, one fit per setup)")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    predict_tokens = [parse_tokens(t) for t in args.predict_tokens]
    if args.merge:
        rows = [row for path in args.merge for row in json.loads(path.read_text())["rows"]]
        report(rows, args, predict_tokens)
        return
    import torch

    runs = [(size, parse_tokens(args.tokens)) for size in args.sizes]
    runs += [(size, parse_tokens(tokens)) for size, tokens in (e.split(":") for e in args.extra_tokens)]
    rows: list[dict[str, Any]] = []
    flip = False
    for size, (batch, block) in runs:
        hidden, layers = SHAPES[size][0], SHAPES[size][1]
        folders = {dtype: save_random_backbone(size, args.cache / f"{size}-{dtype}", getattr(torch, dtype))
                   for dtype in ("float32", "bfloat16")}
        for setup_name in args.setups:
            setup = SETUPS[setup_name]
            folder = folders["bfloat16" if setup.dtype == "bfloat16" else "float32"]
            for side in (SIDES[::-1] if flip else SIDES):
                spec = {"folder": str(folder), "side": side, "setup": setup_name, "batch": batch, "block": block,
                        "steps": args.steps}
                result = probe_in_subprocess([__file__, "--child", json.dumps(spec)], timeout=3600)
                rows.append({"size": size, "params": parameter_count(size), "layers": layers, "hidden": hidden,
                             "vocab": VOCAB, "tokens": batch * block, "setup": setup_name, "side": side, "load": load_average()[0],
                             **result})
                print(f"{size} {batch}x{block} {setup_name} {side}: peak {result['peak_rss_mib']:.0f} MiB, "
                      f"step {result['step_s'][-1]:.1f} s", flush=True)
            flip = not flip
            report(rows, args, predict_tokens)


if __name__ == "__main__":
    main()
