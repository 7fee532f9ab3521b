"""The Slurm requeue cycle, simulated on one machine with the real console script.

Launch 1 runs as Slurm task 0 of job 4242 with a fake ``scontrol`` on PATH. At optimiser step 4 it receives SIGUSR1
(what ``#SBATCH --signal=SIGUSR1@90`` delivers): Lightning's SLURMEnvironment auto-requeue writes
``hpc_ckpt_1.ckpt`` and runs ``scontrol requeue 4242``; our scontrol answers like Slurm, with SIGTERM, and the job
stops. Launch 2 is the same command line (``--ckpt_path last``, as in slurm/fit.sbatch): it must resume from the
requeue checkpoint, which is newer than ``last.ckpt`` (step 3), and end with the adapter weights and rank state of an
uninterrupted run.
"""
from __future__ import annotations

import torch
import pytest

from tests.cluster.launcher import JOB_ID, assert_same, available_methods, finish, launch, slurm_env, write_config

pytestmark = pytest.mark.integration
COMPARED_CALLBACKS = ("RankPruningScheduler", "HypernetWarmup")


def callbacks(folder, sensitivity_log, signal_step=None):
    out = [{"class_path": "cluster_callbacks.DumpState", "init_args": {"path": str(folder / "final{rank}.pt")}},
           {"class_path": "cluster_callbacks.CountingEstimator", "init_args": {"record": str(sensitivity_log)}}]
    if signal_step is not None:
        out.insert(0, {"class_path": "cluster_callbacks.SignalAtStep",
                       "init_args": {"step": signal_step, "marker": str(folder / "signalled")}})
    return out


@pytest.mark.parametrize("method", available_methods())
def test_requeue_resumes_to_the_uninterrupted_result(method, tiny_bert, tmp_path, fake_scontrol):
    if method != "SensitivityLoRAModule":  # the estimator callback only belongs to Sensitivity-LoRA runs
        make = lambda folder, log, step=None: [c for c in callbacks(folder, log, step)
                                               if "CountingEstimator" not in c["class_path"]]
    else:
        make = callbacks
    # the uninterrupted run: same command, no signal
    reference = write_config(tmp_path / "reference", tiny_bert, method, callbacks=make(
        tmp_path / "reference", tmp_path / "reference" / "calibrations.log"), checkpoint_every=3)
    reference_run = launch(reference, env=slurm_env())
    run = tmp_path / "job"
    config = write_config(run, tiny_bert, method, callbacks=make(run, run / "calibrations.log", 4), checkpoint_every=3)

    first = launch(config, env=slurm_env(), log=run / "first.log")
    code, output = finish(first, run / "first.log")
    assert fake_scontrol.read_text().split("\n")[0] == f"requeue {JOB_ID}", output[-3000:]
    assert (run / "hpc_ckpt_1.ckpt").is_file(), output[-3000:]
    assert torch.load(run / "hpc_ckpt_1.ckpt", weights_only=True)["global_step"] == 4
    assert not (run / "final0.pt").exists(), "the first launch went on training after the requeue"

    second = launch(config, env=slurm_env(), log=run / "second.log")
    code, output = finish(second, run / "second.log")
    assert code == 0, output[-3000:]
    assert f"resuming from {run / 'hpc_ckpt_1.ckpt'}" in output

    code, ref_output = finish(reference_run, tmp_path / "reference" / "launch.log")
    assert code == 0, ref_output[-3000:]
    expected, resumed = torch.load(tmp_path / "reference" / "final0.pt"), torch.load(run / "final0.pt")
    assert resumed["global_step"] == expected["global_step"] == 8
    assert_same(resumed["adapter"], expected["adapter"], "adapter")
    for name in COMPARED_CALLBACKS:
        assert (name in resumed["callbacks"]) == (name in expected["callbacks"])
        if name in expected["callbacks"]:
            assert_same(resumed["callbacks"][name], expected["callbacks"][name], name)
    assert_same(resumed.get("masks"), expected.get("masks"), "masks")
    assert_same(resumed["allocation"], expected["allocation"], "allocation")
    if method == "SensitivityLoRAModule":
        assert (run / "calibrations.log").read_text().count("calibrated") == 1, "the relaunch recalibrated"
        assert resumed["allocation"] == expected["allocation"]
    if method in ("AdaLoRAModule", "HyperAdaLoRAModule"):
        state = resumed["callbacks"]["RankPruningScheduler"]
        assert state["finalised"] and state["importance"]["exp_avg_ipt"], "pruning state missing"
