"""Helpers for the cluster tests: tiny ``lora-lightning fit`` configs, Slurm environments of simulated nodes, a fake
``scontrol`` and subprocess launches of the real console script (one process = one Slurm task)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).parent
SCRIPT = str(Path(sys.executable).with_name("lora-lightning"))
JOB_ID = "4242"

# Every method in lora_lightning.modules, with small settings: 16 samples, batch 4 = 4 steps an epoch.
METHODS = {
    "LoRAModule": {"rank": 2},
    "AdaLoRAModule": {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2},
    "SensitivityLoRAModule": {"r_avg": 2, "r_min": 1, "num_batches": 2},
    "HyperAdaLoRAModule": {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2, "hypernet_hidden": 8,
                           "hypernet_heads": 2, "hypernet_warmup": 2},
    "HyperLoRAModule": {"rank": 2, "hypernet_hidden": 8, "hypernet_heads": 2, "hypernet_warmup": 2},
}


def available_methods() -> list[str]:
    from lora_lightning import modules

    return [name for name in METHODS if hasattr(modules, name)]


def write_config(folder: Path, backbone: str, method: str = "LoRAModule", max_steps: int = 8,
                 callbacks: list | None = None, checkpoint_every: int | None = None, **trainer) -> Path:
    """A fit config as a user writes one; ``callbacks`` are ``class_path`` dicts (this folder is importable)."""
    callbacks = list(callbacks or [])
    if checkpoint_every:
        callbacks.append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                          "init_args": {"dirpath": str(folder / "checkpoints"), "every_n_train_steps": checkpoint_every,
                                        "save_last": True, "save_top_k": -1}})
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "max_steps": max_steps, "logger": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "limit_val_batches": 0, "deterministic": True,
                    "enable_checkpointing": bool(checkpoint_every), "default_root_dir": str(folder),
                    "callbacks": callbacks, **trainer},
        "model": {"class_path": f"lora_lightning.modules.{method}",
                  "init_args": {"backbone": backbone, "target_modules": ["query", "value"], "learning_rate": 0.01,
                                **METHODS[method]}},
        "data": {"class_path": "lora_lightning.data.TextClassificationDataModule",
                 "init_args": {"source": "rotten_tomatoes", "max_train_samples": 16, "max_eval_samples": 8,
                               "max_length": 32, "batch_size": 4}},
    }
    path = folder / "config.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_env(node: int = 0, nodes: int = 1, port: int | None = None) -> dict[str, str]:
    """What ``srun`` sets for the task on node ``node`` of an ``--nodes=<nodes> --ntasks-per-node=1`` job."""
    return {
        "SLURM_JOB_ID": JOB_ID, "SLURM_JOB_NAME": "lora-fit", "SLURM_NNODES": str(nodes),
        "SLURM_NTASKS": str(nodes), "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": str(node),
        "SLURM_LOCALID": "0", "SLURM_NODEID": str(node), "SLURM_NODELIST": "localhost",
        "MASTER_PORT": str(port or free_port()),
    }


def launch(config: Path, env: dict[str, str] | None = None, extra: list[str] | None = None,
           log: Path | None = None) -> subprocess.Popen:
    """``lora-lightning fit --config <config> ... --ckpt_path last`` as the sbatch template runs it."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("MASTER_ADDR", "MASTER_PORT")}
    full_env = {**inherited, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
                "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    scontrol = config.parent.parent / "bin"
    if scontrol.is_dir():
        full_env["PATH"] = f"{scontrol}{os.pathsep}{full_env['PATH']}"
    nodes = (env or {}).get("SLURM_NNODES", "1")
    tasks = (env or {}).get("SLURM_NTASKS_PER_NODE", "1")
    args = [SCRIPT, "fit", "--config", str(config), "--trainer.num_nodes", nodes, "--trainer.devices", tasks,
            *(extra or []), "--ckpt_path", "last"]
    log = log or config.parent / "launch.log"
    handle = open(log, "ab")
    return subprocess.Popen(args, env=full_env, stdout=handle, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, log: Path, timeout: float = 300) -> tuple[int, str]:
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return code, log.read_text(errors="replace")


def assert_same(a, b, path: str = "") -> None:
    """Recursive equality of dumped states (tensors to 1e-6)."""
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda m: f"{path}: {m}")
    elif isinstance(a, dict):
        assert set(a) == set(b), (path, sorted(set(a) ^ set(b)))
        for key in a:
            assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)
