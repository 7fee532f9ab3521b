"""The Slurm requeue cycle, simulated on one machine with the real console script.

Launch 1 runs as Slurm task 0 of job 4242 with a fake ``scontrol`` on PATH. At optimiser step 5 (in the middle of
epoch 1: 4 steps an epoch, the batch after step 5 already fetched) it receives SIGUSR1 (what
``#SBATCH --signal=SIGUSR1@90`` delivers): Lightning's SLURMEnvironment auto-requeue writes ``hpc_ckpt_1.ckpt`` and
runs ``scontrol requeue 4242``; our scontrol answers like Slurm, with SIGTERM, and the job stops. Launch 2 is the same
command line (``--ckpt_path last``, as in slurm/fit.sbatch): it must resume from the requeue checkpoint, which is
newer than ``last.ckpt`` (step 4), continue epoch 1 at its second batch (the training DataLoader is resumable) and
end with the adapter weights and rank state of an uninterrupted run. (Launch 1 still finishes the batch it had
fetched, step 6, before the SIGTERM stops it; checkpoints every 4 steps keep its files older than the requeue one.)
"""
from __future__ import annotations

import torch
import pytest

from tests.data.test_resumable_loader import sampler_state
from tests.cluster.launcher import JOB_ID, assert_same, available_methods, finish, launch, slurm_env, write_config

pytestmark = pytest.mark.integration
COMPARED_CALLBACKS = ("RankPruningScheduler", "HypernetWarmup")
SIGNAL_STEP = 5  # mid-epoch: one batch of epoch 1 consumed (4 steps an epoch)
CHECKPOINT_EVERY = 4  # last.ckpt at step 4 and 8: older than the requeue checkpoint when launch 1 stops


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
        tmp_path / "reference", tmp_path / "reference" / "calibrations.log"), checkpoint_every=CHECKPOINT_EVERY)
    reference_run = launch(reference, env=slurm_env())
    run = tmp_path / "job"
    config = write_config(run, tiny_bert, method, callbacks=make(run, run / "calibrations.log", SIGNAL_STEP),
                          checkpoint_every=CHECKPOINT_EVERY)

    first = launch(config, env=slurm_env(), log=run / "first.log")
    code, output = finish(first, run / "first.log")
    assert fake_scontrol.read_text().split("\n")[0] == f"requeue {JOB_ID}", output[-3000:]
    assert (run / "hpc_ckpt_1.ckpt").is_file(), output[-3000:]
    requeue_checkpoint = torch.load(run / "hpc_ckpt_1.ckpt", weights_only=True)
    assert requeue_checkpoint["global_step"] == SIGNAL_STEP
    # written in the signal handler at the start of batch 1 of epoch 1: fetched (2 batches of 4 in the sampler's
    # state) but not trained on (1 processed batch in the loop's state), so the resumed fit skips 1 batch, not 2
    (loader_state,) = requeue_checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert sampler_state(loader_state) == {"epoch": 1, "yielded": 8}
    assert requeue_checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"] == 1
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
