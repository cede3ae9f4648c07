"""Attribution across processes and nodes: equal scores at any world size, no per-step synchronisation,
sharding without overlap or loss, preemption (SIGUSR1 / SIGTERM) and resume without loss.

Runs of ``cad fit`` are subprocesses (Lightning launches the second rank of ``--trainer.devices 2`` itself; the
two-node runs are launched here with the environment variables a cluster would set). Five items on two
ranks, and two runs of prompts to preserve: uneven shards (4 + 3).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_runs import (
    TESTS,
    TINY,
    TOLERANCE,
    cad_fit,
    environment,
    free_port,
    latest_scores,
    max_relative_difference,
)

from cad_lightning.data.attribution_datamodule import PADDING, ItemList, ItemShardSampler

# multi-process runs are slow; the sharding itself is not


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """The root of the tiny run on one process."""
    root = tmp_path_factory.mktemp("one_process")
    cad_fit(root)
    return root


@pytest.fixture(scope="module")
def reference(reference_run) -> dict[str, torch.Tensor]:
    """The scores of the tiny run on one process."""
    return latest_scores(reference_run)


def latest_edits(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    runs = sorted((root / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    return {path.name: load_file(path) for path in sorted((runs[-1] / "edits").glob("*.safetensors"))}


@pytest.mark.parametrize("n", [1, 2, 5, 7])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shards_cover_every_item_once(n, world_size):
    dataset = ItemList([{"item_id": i} for i in range(n)])
    shards = [list(ItemShardSampler(dataset, num_replicas=world_size, rank=r)) for r in range(world_size)]
    assert len({len(s) for s in shards}) == 1  # the same number of steps on every rank
    items = [i for s in shards for i in s if i != PADDING]
    assert sorted(items) == list(range(n))  # no item lost, none twice
    assert all(dataset[PADDING] is None for s in shards for i in s if i == PADDING)


@pytest.mark.slow
def test_two_processes_give_the_one_process_scores(tmp_path, reference):
    cad_fit(tmp_path, "--trainer.devices", "2", "--trainer.strategy", "ddp")
    assert max_relative_difference(latest_scores(tmp_path), reference) <= TOLERANCE
    meta = json.loads(next((tmp_path / "lightning_logs").glob("version_*/attribution/meta.json")).read_text())
    assert meta["world_size"] == 2 and meta["items"] == 5


@pytest.mark.slow
def test_two_nodes_reduce_once_and_give_the_one_process_scores(tmp_path, reference):
    """Two nodes of one process each, launched with the environment variables of a cluster; every collective
    call is recorded: none inside a training step, no DistributedDataParallel wrapper or buffer broadcast, no
    gradients, and the score buffers are all-reduced exactly once each."""
    port = str(free_port())
    out = tmp_path / "calls.json"
    args = [sys.executable, str(TESTS / "ddp_probe.py"), str(out), *TINY, "--trainer.default_root_dir", str(tmp_path),
            "--trainer.num_nodes", "2", "--trainer.devices", "1", "--trainer.strategy", "ddp",
            "--model.editing.rescore_every", "null"]  # one epoch: the calls counted below are its own
    procs = [subprocess.Popen(args, env=environment(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(rank),
                                                    LOCAL_RANK="0", WORLD_SIZE="2"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    scores = latest_scores(tmp_path)
    assert max_relative_difference(scores, reference) <= TOLERANCE

    buffer_sizes = sorted(t.numel() for t in scores.values())
    for rank in range(2):
        record = json.loads(out.with_suffix(f".rank{rank}.json").read_text())
        assert record["world_size"] == 2 and record["strategy"] == "AttributionStrategy"
        assert record["wrapped"] == "CADModule" and record["grads"] == []
        calls = record["calls"]
        assert [c for c in calls if c["phase"] == "step"] == []
        assert [c for c in calls if c["op"] == "_broadcast_coalesced"] == []
        # the only tensors sent at every step are one-element stop flags: Lightning's (broadcast before the
        # step) and the preemption agreement (all-reduced after it)
        assert [c for c in calls if c["op"] == "broadcast" and c["numel"] != 1] == []
        assert len([c for c in calls if c["op"] == "broadcast"]) == record["batches"] == 4  # 5 + 2 items on 2 ranks: 4 + 3
        assert [c for c in calls if (c["numel"] or 0) > 1 and c["phase"] == "setup"] == []
        # reduced once, after the last step: every score buffer; one-element counts and sums (scores, mean J),
        # Lightning's stop decision and the writer's two stop points (every rank agrees on a signal there)
        reduced = sorted(c["numel"] for c in calls if c["op"] == "all_reduce" and c["phase"] == "between")
        assert [n for n in reduced if n > 1] == buffer_sizes
        assert len(reduced) <= len(buffer_sizes) + record["batches"] + 4 + 2


@pytest.mark.slow
def test_preempted_two_process_run_resumes_on_one_process(tmp_path, reference):
    """SIGUSR1 reaches only rank 1, during its second batch: the ranks agree to stop, each saves its finished
    items; the same command on one process (another world size) resumes, attributes only the rest, and ends
    with the scores of an uninterrupted run; a run of another config in the same root, in between, starts
    afresh and leaves that saved state alone."""
    stopped = cad_fit(tmp_path, "--trainer.devices", "2", "--trainer.strategy", "ddp",
                      "--trainer.callbacks+=signal_at.SignalAt", "--trainer.callbacks.init_args.batch", "1",
                      "--trainer.callbacks.init_args.ranks", "[1]", check=False)
    assert stopped.returncode != 0
    states = sorted((tmp_path / "preemption").glob("*/state-*.pt"))
    assert len(states) == 2 and len({s.parent for s in states}) == 1, stopped.stderr[-3000:]
    assert not list(tmp_path.glob("lightning_logs/*/attribution/scores.safetensors"))

    other = cad_fit(tmp_path, "--data.seed", "1")  # another config, the same root
    assert "already attributed" not in other.stdout + other.stderr and "other configs" in other.stdout + other.stderr
    assert sorted((tmp_path / "preemption").glob("*/state-*.pt")) == states

    resumed = cad_fit(tmp_path)
    assert "4 item(s) already attributed" in resumed.stdout + resumed.stderr
    assert max_relative_difference(latest_scores(tmp_path), reference) <= TOLERANCE
    assert not (tmp_path / "preemption").exists()  # spent once the artifacts are written, its folders removed


@pytest.mark.slow
def test_sigterm_twice_then_resume_gives_the_uninterrupted_scores_bit_for_bit(tmp_path, reference):
    """Stopped by SIGTERM after 3 items, resumed and stopped again after 5: the second save takes the place of
    the first (every item counted once), and the run that ends is bit for bit the uninterrupted run (one
    process both times: each rank continues its own sums in their order)."""
    signal_at = ["--trainer.callbacks+=signal_at.SignalAt", "--trainer.callbacks.init_args.signum", "SIGTERM"]
    stopped = cad_fit(tmp_path, *signal_at, "--trainer.callbacks.init_args.batch", "2", check=False)
    assert len(list((tmp_path / "preemption").glob("*/state-*.pt"))) == 1, stopped.stderr[-3000:]
    assert not list(tmp_path.glob("lightning_logs/*/attribution/scores.safetensors"))
    again = cad_fit(tmp_path, *signal_at, "--trainer.callbacks.init_args.batch", "4", check=False)
    assert "3 item(s) already attributed" in again.stdout + again.stderr and again.returncode != 0
    resumed = cad_fit(tmp_path)
    assert "5 item(s) already attributed" in resumed.stdout + resumed.stderr
    scores = latest_scores(tmp_path)
    assert set(scores) == set(reference)
    assert all(torch.equal(scores[k], reference[k]) for k in reference)


EVALUATE_SMALL = ["--model.exam.evaluate", "true", "--model.exam.evaluate_at", "all",
                  "--model.exam.eval_target_images", "4", "--model.exam.eval_retain_images",
                  "4", "--model.exam.floor_images", "4", "--model.exam.random_draws", "1"]


@pytest.mark.parametrize("moment, phase", [
    (["--trainer.callbacks.init_args.after_last_epoch", "true"], "writing"),
    (["--trainer.callbacks.init_args.when_written", "lightning_logs/*/edits/*.safetensors"], "evaluation"),
])
@pytest.mark.slow
def test_a_signal_after_the_last_batch_saves_the_scores_and_the_rerun_attributes_nothing(tmp_path, reference, moment, phase):
    """SIGTERM once every item is attributed (before anything is written, or while the edits are evaluated):
    the run stops with its results saved; the rerun runs no training batch (a signal at its first batch would
    stop it), writes the artifacts from the saved scores (bit for bit the uninterrupted run's) and removes them."""
    evaluation = EVALUATE_SMALL if phase == "evaluation" else []  # the writer's options, before the callback is added
    stopped = cad_fit(tmp_path, *evaluation, "--trainer.callbacks+=signal_at.SignalAt",
                      "--trainer.callbacks.init_args.signum", "SIGTERM", *moment, check=False)
    assert stopped.returncode != 0 and f"during {phase}" in stopped.stderr, stopped.stderr[-3000:]
    assert len(list((tmp_path / "preemption").glob("*/results.pt"))) == 1
    assert not list((tmp_path / "preemption").glob("*/state-*.pt"))
    assert not list(tmp_path.glob("lightning_logs/*/report.json"))

    rerun = cad_fit(tmp_path, *evaluation, "--trainer.callbacks+=signal_at.SignalAt", "--trainer.callbacks.init_args.batch", "0")
    assert "Resumed after attribution" in rerun.stdout + rerun.stderr
    scores = latest_scores(tmp_path)
    assert set(scores) == set(reference) and all(torch.equal(scores[k], reference[k]) for k in reference)
    report = json.loads(sorted(tmp_path.glob("lightning_logs/*/report.json"))[-1].read_text())
    assert report["edits"] and (phase != "evaluation" or report["results"])
    assert not (tmp_path / "preemption").exists()


@pytest.mark.slow
def test_a_signal_in_the_rescoring_epoch_resumes_at_that_epoch(tmp_path, reference, reference_run):
    """The default config scores twice: the unedited model, then the model carrying the 20% edit. SIGTERM in the
    second epoch saves the first epoch's results (scores, sensitivity, the edit so far); the rerun runs only the
    second epoch's attribution and writes the uninterrupted run's scores and edits, bit for bit."""
    stopped = cad_fit(tmp_path, "--trainer.callbacks+=signal_at.SignalAt", "--trainer.callbacks.init_args.signum",
                      "SIGTERM", "--trainer.callbacks.init_args.epoch", "1", "--trainer.callbacks.init_args.batch", "1",
                      check=False)
    assert stopped.returncode != 0 and len(list((tmp_path / "preemption").glob("*/results.pt"))) == 1, stopped.stderr[-3000:]
    rerun = cad_fit(tmp_path)
    assert "after epoch 1 of 2" in rerun.stdout + rerun.stderr
    scores = latest_scores(tmp_path)
    assert set(scores) == set(reference) and all(torch.equal(scores[k], reference[k]) for k in reference)
    edits, expected = latest_edits(tmp_path), latest_edits(reference_run)
    assert set(edits) == set(expected) and len(expected) >= 2
    for name, masks in expected.items():
        assert all(torch.equal(edits[name][k], masks[k]) for k in masks), name
    assert not (tmp_path / "preemption").exists()


@pytest.mark.slow
def test_regression_rows_and_coefficients_do_not_depend_on_the_world_size(tmp_path):
    """The regression estimator on 1 and on 2 processes (mask ids sharded, rows gathered on rank 0): the same
    mask scores and the same fitted coefficients; its edit staged at 20% (fitted on rank 0, put on the model of
    every rank, every mask scored again): the same staged edit and the same second-stage scores."""
    from safetensors.torch import load_file

    results = {}
    for devices in (1, 2):
        root = tmp_path / f"devices_{devices}"
        args = [sys.executable, "-m", "cad_lightning.cli", "fit", "--config", str(TESTS.parent / "configs" / "attribute_regression.yaml"),
                "--data.masks", "10", "--data.heldout_masks", "3", "--data.samples", "1", "--data.batch_size", "2",
                "--model.num_inference_steps", "2", "--trainer.accelerator", "cpu", "--trainer.devices", str(devices),
                "--trainer.strategy", "ddp" if devices == 2 else "auto", "--trainer.enable_progress_bar", "false",
                "--trainer.default_root_dir", str(root), "--trainer.callbacks.init_args.ratios", "[0.2, 0.25]",
                "--trainer.callbacks.init_args.evaluate", "false", "--trainer.callbacks.init_args.save_unet", "false",
                "--trainer.callbacks.init_args.damage_prompts", "1"]
        run = subprocess.run(args, env=environment(), capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        stages = []
        for folder in [root / "mask_scores", *sorted((root / "mask_scores").glob("stage-1-*"))]:
            rows = {}
            for chunk in folder.glob("chunk-*.json"):
                record = json.loads(chunk.read_text())
                rows.update(zip(record["ids"], record["scores"]))
            stages.append((folder.name, rows))
        version = next((root / "lightning_logs").glob("version_*"))
        results[devices] = (stages, load_file(version / "attribution" / "component_scores.safetensors")["coefficients"],
                            load_file(version / "edits" / "regression-erase-0.25.safetensors"))
    one, two = results[1][0], results[2][0]
    assert len(one) == len(two) == 2 and one[1][0] == two[1][0]  # one second stage, of the same staged edit
    for (_, rows_one), (_, rows_two) in zip(one, two):
        assert sorted(rows_one) == sorted(rows_two) and len(rows_one) == 13
        for mask_id, score in rows_one.items():
            assert rows_two[mask_id] == pytest.approx(score, rel=1e-5, abs=1e-7)
    a, b = results[1][1], results[2][1]
    assert float((a - b).abs().max() / a.abs().max()) <= TOLERANCE
    assert all(torch.equal(results[1][2][n], results[2][2][n]) for n in results[1][2])


EXAM_SMALL = ["--model.exam.evaluate", "true", "--model.exam.evaluate_at", "goal",
              "--model.exam.eval_target_images", "8", "--model.exam.eval_retain_images",
              "8", "--model.exam.floor_images", "8", "--model.exam.random_draws", "2"]


@pytest.mark.slow
def test_the_default_job_with_its_exam_on_two_processes_gives_the_one_process_report(tmp_path, reference):
    """The default config (goal mode: search seeds decide, report seeds report) with a small exam, on 1 and on 2
    CPU DDP processes: both finish, with the same scores, the same edits searched and chosen, and the same report
    (targets within one image, SSIM within 0.005); the exam's images are sampled in shards on both ranks."""
    reports, edits = {}, {}
    for devices in (1, 2):
        root = tmp_path / f"devices_{devices}"
        extra = ["--trainer.devices", "2", "--trainer.strategy", "ddp"] if devices == 2 else []
        cad_fit(root, *EXAM_SMALL, *extra)
        assert max_relative_difference(latest_scores(root), reference) <= TOLERANCE
        runs = list((root / "lightning_logs").glob("version_*"))
        assert len(runs) == 1  # one run directory, written by rank 0
        reports[devices] = json.loads((runs[0] / "report.json").read_text())
        edits[devices] = latest_edits(root)
    one, two = reports[1], reports[2]
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert set(edits[1]) == set(edits[2]) and edits[1]
    for name, masks in edits[1].items():
        assert all(torch.equal(edits[2][name][k], masks[k]) for k in masks), name
    assert one["exam"]["chosen"] == two["exam"]["chosen"]
    for key in ("search_results", None):
        rows_one = one["exam"][key] if key else one["results"]
        rows_two = two["exam"][key] if key else two["results"]
        assert [(r["selection"], r["ratio"]) for r in rows_one] == [(r["selection"], r["ratio"]) for r in rows_two]
        for a, b in zip(rows_one, rows_two):
            assert abs(a["target"] - b["target"]) <= 1 / 8 + 1e-9  # within one image of eight
            assert abs(a["retained_ssim"] - b["retained_ssim"]) <= 0.005
            assert a["selective"] == b["selective"]
    assert one["floor"] == pytest.approx(two["floor"], abs=1 / 8 + 1e-9)


def cad_test_on_one_and_two_processes(tmp_path: Path, reference_run: Path, *extra: str) -> dict[int, dict]:
    """``cad test`` of the reference run's selective edit on 1 and on 2 processes: ``{devices: evaluation.json}``."""
    edit = sorted((reference_run / "lightning_logs").glob("version_*/edits/selective-erase-0.2.safetensors"))[-1]
    outs = {}
    for devices in (1, 2):
        root = tmp_path / f"devices_{devices}"
        args = [sys.executable, "-m", "cad_lightning.cli", "test", "--config", str(TESTS.parent / "configs" / "evaluate.yaml"),
                "--trainer.accelerator", "cpu", "--trainer.devices", str(devices), "--trainer.enable_progress_bar", "false",
                "--trainer.default_root_dir", str(root), "--model.edit", str(edit), *extra,
                *(["--trainer.strategy", "ddp"] if devices == 2 else [])]
        run = subprocess.run(args, env=environment(), capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stderr[-3000:]
        outs[devices] = json.loads(next(root.rglob("evaluation.json")).read_text())
    return outs


@pytest.mark.slow
def test_cad_test_on_two_processes_reads_every_item_once(tmp_path, reference_run):
    """``cad test`` of an edit on 1 and on 2 processes (9 items: Lightning's sampler pads the second shard):
    the same evaluation.json, every item counted once."""
    outs = cad_test_on_one_and_two_processes(tmp_path, reference_run, "--data.target_images", "5",
                                             "--data.retain_images", "4", "--data.batch_size", "3",
                                             "--model.num_inference_steps", "3")
    one, two = outs[1], outs[2]
    assert one["images"] == two["images"] == 9 and (one["world_size"], two["world_size"]) == (1, 2)
    assert one["accuracy"] == two["accuracy"] and one["unedited_accuracy"] == two["unedited_accuracy"]
    assert one["edited"]["retained_ssim"] == pytest.approx(two["edited"]["retained_ssim"], abs=0.005)


@pytest.mark.slow
def test_attacks_on_two_processes_read_what_one_process_reads(tmp_path, reference_run):
    """``cad test`` with both attacks on 1 and on 2 processes: each rank learns the same token and searches the same
    prompts, the images are sampled in shards, and every reading is the one process's."""
    outs = cad_test_on_one_and_two_processes(
        tmp_path, reference_run, "--data.target_images", "3", "--data.retain_images", "2",
        "--model.attacks", "[inversion, prompt_search]", "--model.attack_images", "5", "--model.inversion.steps", "3",
        "--model.inversion.batch_size", "2", "--model.inversion.images", "3", "--model.prompt_search.budget", "3",
        "--model.prompt_search.keep", "2", "--model.prompt_search.images", "3", "--model.prompt_search.timesteps", "2")
    one, two = outs[1]["attacks"]["models"], outs[2]["attacks"]["models"]
    assert list(one) == list(two) == ["unedited", "edit", "random"]
    for name in one:
        for attack in ("inversion", "prompt_search"):
            assert one[name][attack]["target"] == pytest.approx(two[name][attack]["target"], abs=1 / 5 + 1e-9), name
        assert one[name]["prompt_search"]["prompt"] == two[name]["prompt_search"]["prompt"]
        assert one[name]["plain"] == pytest.approx(two[name]["plain"], abs=1 / 5 + 1e-9)


@pytest.mark.slow
def test_the_robust_mode_on_two_processes_hardens_the_edit_on_every_rank(tmp_path):
    """The robust rounds on 2 CPU DDP processes (each rank learns rank 0's tokens, scores are rank 0's, the
    readings' images are sampled in shards): the job finishes, and the written edit is the chosen K/V edit plus the
    rounds' weights, as the report records them."""
    from cad_lightning.editing import load_masks

    cad_fit(tmp_path, *EXAM_SMALL, "--trainer.devices", "2", "--trainer.strategy", "ddp",
            "--model.editing.ratios", "[0.01]", "--model.editing.rescore_every", "null",
            "--model.editing.robust.enabled", "true", "--model.editing.robust.fractions", "[0.01, 0.02]",
            "--model.editing.robust.rounds", "1", "--model.editing.robust.images", "8",
            "--model.editing.robust.retain_images", "4", "--model.editing.robust.read_images", "4",
            "--model.editing.robust.timesteps", "1", "--model.editing.robust.inversion.steps", "20",
            "--model.editing.robust.inversion.batch_size", "4", "--model.editing.robust.retain", "0")
    run = next((tmp_path / "lightning_logs").glob("version_*"))
    report = json.loads((run / "report.json").read_text())
    assert report["world_size"] == 2
    record = report["exam"]["robust"]["selective"]
    edit = load_masks(run / "edits" / "selective-erase-0.01.safetensors")
    beyond = sum(int((~m).sum()) for n, m in edit.items() if not ("attn2.to_k" in n or "attn2.to_v" in n))
    assert beyond == record["ablated_beyond"]
    assert next(r for r in report["results"] if r["selection"] == "selective")["ablated"] == sum(
        int((~m).sum()) for m in edit.values())
