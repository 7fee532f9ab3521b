"""Helpers shared by the benchmark scripts: interleaved timing, peak memory, Markdown tables, result files.

Every script runs its contenders side by side in one process (benchmarks/README.md); these helpers keep the
measurement rules identical across scripts:

* :func:`interleaved_times` runs the contenders round-robin (warmup rounds first, not recorded), so drift on a
  shared machine (other jobs, thermal throttling) hits every contender alike; :func:`summarize` gives the median.
* :func:`probe_in_subprocess` runs a memory probe in a fresh Python process, where :func:`reset_peak_rss` /
  :func:`peak_rss_mb` read the kernel's resident-set high-water mark (see :func:`reset_peak_rss` for why RSS).
* :func:`quiet_cpu_trainer` is the one-process CPU ``Trainer`` that keeps nothing, for fits that only measure.
* :func:`write_results` writes ``benchmarks/results/<name>.json`` and ``.md`` with the exact reproduce command
  and the environment (torch / transformers / peft versions, CPU count, threads).
"""
from __future__ import annotations

import gc
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


# ----------------------------------------------------------------------------- timing
def interleaved_times(
    contenders: Mapping[str, Callable[[int], Any]],
    steps: int,
    warmup: int,
    cpu_times: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Wall-clock seconds per call of each ``fn(step_index)``, contenders run round-robin within every round.

    ``warmup`` rounds run first and are discarded (allocator growth, lazy init, optimiser state creation).
    The garbage collector is paused while a call is timed and run between rounds, never inside a timing.
    If ``cpu_times`` is given it receives the process CPU seconds of each call (``time.process_time``): on a
    machine shared with other jobs, CPU time counts only the cycles this process got and is far less inflated
    by contention than wall time (with one torch thread; with more, OpenMP spin-waiting is counted too).
    """
    times: dict[str, list[float]] = {name: [] for name in contenders}
    if cpu_times is not None:
        cpu_times.update({name: [] for name in contenders})
    for round_index in range(warmup + steps):
        for name, fn in contenders.items():
            gc.collect()
            gc.disable()
            try:
                cpu_start, start = time.process_time(), time.perf_counter()
                fn(round_index)
                elapsed, cpu_elapsed = time.perf_counter() - start, time.process_time() - cpu_start
            finally:
                gc.enable()
            if round_index >= warmup:
                times[name].append(elapsed)
                if cpu_times is not None:
                    cpu_times[name].append(cpu_elapsed)
    return times


def module_training_step(module: Any, batches: Sequence[Mapping[str, Any]], optimizer: Any,
                         after_step: Callable[[], None] | None = None) -> Callable[[int], None]:
    """A closure running training step ``i`` of a lora-lightning module on ``batches[i % len]``: the task loss plus
    the method's extra losses (AdaLoRA's orthogonal regulariser), backward, optimiser step, then ``after_step``
    (e.g. HyperAdaLoRA's recurrent update) — what ``training_step`` does, without Lightning's loop around it."""
    module.train()

    def step(i: int) -> None:
        batch = batches[i % len(batches)]
        loss = module.task.loss(module(batch), batch)
        extra = module.extra_losses()
        (loss + sum(extra.values()) if extra else loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()

    return step


def summarize(seconds: Sequence[float]) -> dict[str, float]:
    """Median and spread of a list of durations, in milliseconds."""
    ms = sorted(s * 1e3 for s in seconds)
    quartiles = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
    return {
        "median_ms": statistics.median(ms),
        "p25_ms": quartiles[0],
        "p75_ms": quartiles[2],
        "min_ms": ms[0],
        "max_ms": ms[-1],
        "n": len(ms),
    }


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median of per-round ratios: robust to drift that affects both contenders of a round alike."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


# ----------------------------------------------------------------------------- memory
def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float:
    """Current resident set size of this process, in MiB."""
    kb = _status_kb("VmRSS")
    return kb / 1024 if kb is not None else float("nan")


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0: write 5 to ``/proc/self/clear_refs``).

    Why RSS: on CPU, torch allocates tensors with plain ``malloc`` (no caching allocator with peak statistics as
    on CUDA), and ``tracemalloc`` sees only Python's allocator, not tensor storage. The resident-set high-water
    mark counts every page that tensors, activations saved for backward, gradients and optimiser state actually
    touched. Resetting it after the model is loaded removes the loading peak (checkpoint parsing, GGUF
    dequantisation), so the peak read later belongs to the training steps. Returns False where the reset is not
    available; the peak then includes loading and only the absolute value is meaningful.
    """
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Resident-set high-water mark since the process start or the last :func:`reset_peak_rss`, in MiB."""
    kb = _status_kb("VmHWM")
    if kb is None:  # not Linux: ru_maxrss is KiB on Linux, bytes on macOS
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        kb = maxrss / 1024 if sys.platform == "darwin" else maxrss
    return kb / 1024


def probe_in_subprocess(args: Sequence[str], timeout: float = 600) -> dict[str, Any]:
    """Run ``python <args>`` in a fresh process and parse the JSON object on the last line of its stdout.

    A fresh process per contender keeps the memory high-water marks of the contenders apart.
    """
    command = [sys.executable, *args]
    completed = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ}
    )
    if completed.returncode != 0:
        raise RuntimeError(f"Probe {shlex.join(command)} failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- reporting
def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: other jobs on a shared machine distort timings (and are recorded)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment(threads: int | None = None) -> dict[str, Any]:
    """Library versions and machine facts recorded with every result."""
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average": load_average(),
    }
    for package in ("transformers", "peft", "lightning"):
        try:
            env[package] = __import__(package).__version__
        except ImportError:
            env[package] = None
    return env


def reproduce_command(argv: Sequence[str] | None = None) -> str:
    """The command line that produced the results, relative to the repository root."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve()
    try:
        argv[0] = str(script.relative_to(REPO_ROOT))
    except ValueError:
        pass
    return "python " + shlex.join(argv)


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub Markdown table; ``align`` is one character per column (``l`` or ``r``), default text left and
    numbers right."""
    if align is None:
        align = "".join("r" if rows and isinstance(rows[0][i], (int, float)) else "l" for i in range(len(headers)))
    cells = [[fmt(c) if not isinstance(c, str) else c for c in row] for row in rows]
    separator = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(separator) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def write_results(name: str, payload: dict[str, Any], markdown: str, command: str | None = None) -> tuple[Path, Path]:
    """Write ``results/<name>.json`` (payload + command + environment) and ``results/<name>.md``."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    command = command or reproduce_command()
    body = dict(payload)
    env = body.pop("environment", None) or environment()
    payload = {"benchmark": name, "command": command, "environment": env, **body}
    json_path, md_path = RESULTS_DIR / f"{name}.json", RESULTS_DIR / f"{name}.md"
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    md_path.write_text(f"{markdown.rstrip()}\n\nReproduce (from the repository root):\n\n```\n{command}\n```\n")
    return json_path, md_path


@contextmanager
def quiet_cpu_trainer(**options: Any) -> Iterator[Any]:
    """A one-process CPU ``lightning.Trainer`` that keeps nothing (no logger, no checkpoints, no progress bar or
    summary, no sanity validation), rooted in a temporary folder removed on exit; ``options`` add or override."""
    import lightning as L

    with tempfile.TemporaryDirectory() as root:
        yield L.Trainer(**{"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
                           "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
                           "default_root_dir": root, **options})
