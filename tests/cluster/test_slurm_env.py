"""Slurm's environment makes Lightning's SLURMEnvironment take over with the right world size and ranks, and the
shipped sbatch template asks for what that needs (one task per device, the requeue signal, requeueable)."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import lightning as L
import pytest
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.rank_zero import rank_zero_only as fabric_rank_zero_only
from lightning.pytorch.utilities.rank_zero import rank_zero_only

TEMPLATE = Path(__file__).parents[2] / "slurm" / "fit.sbatch"


def task_env(monkeypatch, **values):
    for key in list(__import__("os").environ):
        if key.startswith("SLURM_"):
            monkeypatch.delenv(key)
    for key, value in values.items():
        monkeypatch.setenv(key, str(value))


@pytest.mark.parametrize("procid, nodeid, localid", [(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)])
def test_slurm_variables_give_world_size_and_ranks(monkeypatch, procid, nodeid, localid):
    """Task ``procid`` of ``--nodes=2 --ntasks-per-node=2``: global, local and node rank as Slurm numbers them."""
    task_env(monkeypatch, SLURM_NTASKS=4, SLURM_NTASKS_PER_NODE=2, SLURM_NNODES=2, SLURM_PROCID=procid,
             SLURM_LOCALID=localid, SLURM_NODEID=nodeid, SLURM_JOB_ID=77, SLURM_JOB_NAME="lora-fit",
             SLURM_NODELIST="gpu[017-018]")
    for key in ("MASTER_ADDR", "MASTER_PORT"):  # SLURMEnvironment writes them into os.environ: restore after
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    assert SLURMEnvironment.detect()
    # The Trainer sets the process-wide rank used by every @rank_zero_only function; restore it, or later tests in
    # this process stop logging and warning as if they were rank > 0.
    for holder in (rank_zero_only, fabric_rank_zero_only):
        monkeypatch.setattr(holder, "rank", getattr(holder, "rank", 0))
    trainer = L.Trainer(accelerator="cpu", devices=2, num_nodes=2, strategy="ddp", logger=False)
    environment = trainer.strategy.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue
    assert environment.creates_processes_externally  # srun starts the tasks, Lightning launches nothing
    assert (environment.world_size(), environment.global_rank(), environment.local_rank(), environment.node_rank()) \
        == (4, procid, localid, nodeid)
    assert (trainer.world_size, trainer.global_rank, trainer.local_rank, trainer.node_rank) == (4, procid, localid, nodeid)
    assert environment.main_address == "gpu017"  # the first node of the list hosts rank 0
    assert 10000 <= environment.main_port < 20000  # derived from the job id, the same on every node


def test_interactive_slurm_shell_is_not_a_slurm_launch(monkeypatch):
    """``salloc``/``srun --pty bash`` set SLURM_JOB_NAME=bash: Lightning then launches its processes itself."""
    task_env(monkeypatch, SLURM_NTASKS=1, SLURM_PROCID=0, SLURM_JOB_ID=77, SLURM_JOB_NAME="bash")
    assert not SLURMEnvironment.detect()


def test_sbatch_template_asks_for_requeue_and_passes_the_layout_to_the_cli():
    text = TEMPLATE.read_text()
    directives = dict(re.findall(r"^#SBATCH\s+--([\w-]+)(?:=(\S+))?", text, re.M))
    assert directives["signal"] == "SIGUSR1@90"
    assert "requeue" in directives
    assert {"nodes", "ntasks-per-node", "gpus-per-node"} <= set(directives)
    assert directives["ntasks-per-node"] == directives["gpus-per-node"]  # one task per device
    command = " ".join(line.strip().rstrip("\\") for line in text.splitlines() if not line.startswith("#"))
    assert re.search(r"srun\b.*lora-lightning fit --config", command)
    for arg in ("--trainer.num_nodes \"$SLURM_NNODES\"", "--trainer.devices \"$SLURM_NTASKS_PER_NODE\"",
                "--ckpt_path last"):
        assert arg in command, arg
    if shutil.which("bash"):
        subprocess.run(["bash", "-n", str(TEMPLATE)], check=True)
