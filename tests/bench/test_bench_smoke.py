"""Each benchmark script runs end to end on a tiny budget (``--smoke``) and writes sane results.

These check the code paths only; no number here is a timing assertion.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_script(name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / name), "--smoke", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{name} --smoke failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def finite_positive(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def test_stat_tracker_smoke(tmp_path):
    out = tmp_path / "st.json"
    proc = run_script("stat_tracker.py", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["rows"], "no sizes measured"
    for row in result["rows"]:
        assert finite_positive(row["vectorised_s"]) and finite_positive(row["reference_s"])
        assert row["max_abs_diff"] < 1e-4, "the vectorised tracker disagrees with the reference loop"
        assert row["share_from_buffer_last_round"] > 0, "the buffer phase was never exercised"
    assert "| samples x steps x prompts |" in proc.stdout


def test_cost_smoke(tmp_path):
    out = tmp_path / "cost.json"
    run_script("cost.py", "--out", str(out))
    result = json.loads(out.read_text())
    rows = result["steps_sweep"] + result["batch_sweep"]
    assert [r["steps"] for r in result["steps_sweep"]] == [1, 3]
    for r in rows:
        parts = r["parts"]
        assert set(parts) >= {"sampling", "decode", "reward", "training", "checkpoint", "other", "epoch"}
        assert finite_positive(parts["epoch"]) and finite_positive(r["floor"]["total"])
        assert finite_positive(r["floor_ratio"])
        split = sum(parts[k] for k in ("sampling", "decode", "reward", "training", "checkpoint", "other"))
        assert split == pytest.approx(parts["epoch"], rel=1e-6)
        assert 1 <= r["queries_per_trajectory"] <= 3, "SDPO queries 1 to 3 x0 per trajectory"
        assert r["peak_rss_delta_mb"] >= 0
    # the before/after comparison reads such files: the same file on both sides compares equal
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "cost.py"), "--compare", str(out), f"{out},{out}"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    table = [line for line in proc.stdout.splitlines() if line.startswith("| 2 |")]
    assert len(table) == len(rows), proc.stdout
    assert all(line.rstrip(" |").endswith("1.00") for line in table), proc.stdout


def test_cost_ab_smoke(tmp_path):
    # this tree against its own HEAD through a git worktree: both sides must run and be compared
    if not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "cost_ab.sh"), "--smoke", str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("before_1.json", "after_1.json"):
        rows = json.loads((tmp_path / name).read_text())["steps_sweep"]
        assert rows and finite_positive(rows[0]["floor_ratio"])
    assert "| 2 | 1 |" in (tmp_path / "compare.md").read_text()


def test_gpu_script_smoke_on_cpu(tmp_path):
    # the same code path as on a GPU (random pipeline -> save_pretrained -> Trainer -> its own
    # sample_epoch / train_epoch), on the tiny pipeline of each family
    out = tmp_path / "gpu.json"
    proc = run_script("gpu.py", "--peak-tflops", "1", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["smoke"] and result["peak_tflops"] == 1
    cases = result["cases"]
    # the family read from model_index.json and the sampler from the scheduler config, per case
    expected = {"sd-turbo": ("SDFamily", "DDIMSampler"), "sdxl-turbo": ("SDXLFamily", "DDIMSampler"),
                "sd35-large-turbo": ("SD3Family", "FlowSDESampler"), "flux-schnell": ("FluxFamily", "FlowSDESampler")}
    assert {k: (c["family"], c["sampler"]) for k, c in cases.items()} == expected
    for c in cases.values():
        assert 0 < c["lora_params"] < c["denoiser_params"], "LoRA only is trained"
        assert finite_positive(c["forward_flops_per_item"]) and finite_positive(c["sampling_mfu"])
        assert c["train_flops_per_epoch"] >= 3 * c["epochs"][0]["trained_items"] * c["forward_flops_per_item"]
        assert finite_positive(c["train_mfu"]) and finite_positive(c["train_step_s"])
        run = c["epochs"][0]
        assert run["trajectories"] == 2 * c["sample_batch"], "two trajectories per prompt"
        assert run["trained_items"] == c["steps"] * run["trajectories"], "every step of both trajectories trained"
        assert finite_positive(run["sampling_s"]) and run["sample_epoch_s"] >= run["sampling_s"]
        assert finite_positive(run["train_epoch_s"]) and math.isfinite(run["loss"])
        assert run["first_batch_kl"] < 1e-6, "the trainer's ratio must be 1 before its first update"
    assert "| case | family / sampler |" in proc.stdout


def test_host_ops_smoke(tmp_path):
    # the trainer's own sampling call and training step, profiled: a backward dispatches more
    # operations than the forward it differentiates, and both are timed
    out = tmp_path / "host_ops.json"
    proc = run_script("host_ops.py", "--out", str(out))
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["case"], row["family"], row["precision"]) == ("sd-turbo", "SDFamily", "no")
    assert 0 < row["forward_ops"] < row["fwd_bwd_ops"]
    assert finite_positive(row["forward_ms"]) and finite_positive(row["fwd_bwd_ms"])
    assert "| sd-turbo | no |" in proc.stdout


def test_gpu_run_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_run.sh")], check=True)


@pytest.mark.slow
def test_alignment_smoke(tmp_path):
    run_script("alignment.py", "--out-dir", str(tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert "Equal reward-model queries" in (tmp_path / "alignment.md").read_text()
    s = summary["summary"]
    assert s["ddpo_equal_queries"]["epochs"] == 3 * s["sdpo"]["epochs"] == 3 * s["ddpo_equal_traj"]["epochs"]
    assert s["sdpo"]["trajectories"] == s["ddpo_equal_traj"]["trajectories"]
    for label in ("sdpo", "ddpo_equal_traj", "ddpo_equal_queries"):
        for entry in s[label]["steps"].values():
            assert (
                entry["trained"]["n"] == 2
                and entry["trained"]["lo"] <= entry["trained"]["mean"] <= entry["trained"]["hi"]
            )
    runs = summary["runs"]["ddpo_equal_queries"][0]
    assert len(runs["history"]) == 3 and all("light" in h for h in runs["history"])


@pytest.mark.slow
def test_ablations_smoke(tmp_path):
    run_script("ablations.py", "--out-dir", str(tmp_path))
    results = json.loads((tmp_path / "summary.json").read_text())["results"]
    assert set(results) == {"full", "no_dense", "no_clip"}
    assert "delta" in results["no_clip"] and "delta" not in results["full"]
    assert "| no clipping |" in (tmp_path / "ablations.md").read_text()


def test_dense_check_smoke(tmp_path):
    out = tmp_path / "dense.json"
    run_script("dense_check.py", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["steps"] == 4 and len(result["rows"]) == 4
    last = result["rows"][-1]
    assert last["corr_with_final"] == pytest.approx(1.0)  # the final x0 is the final image
    assert sum(r["anchor_share"] for r in result["rows"]) == pytest.approx(1.0)


@pytest.mark.slow
def test_paper_regime_smoke(tmp_path):
    proc = run_script("paper_regime.py", "--out-dir", str(tmp_path))
    result = json.loads((tmp_path / "summary.json").read_text())
    by_t = result["by_T"]["3"]
    s = by_t["summary"]
    assert set(s) >= {"sdpo", "sdpo_eq_queries", "ddpo", "ddpo_pytorch", "grpo", "nft"}
    # equal queries: SDPO's snapshot at E // 3 of the same run, with fewer queries than at E
    assert s["sdpo_eq_queries"]["epochs"] == 1 and s["sdpo"]["epochs"] == s["grpo"]["epochs"] == 3
    assert s["sdpo_eq_queries"]["queries"] < s["sdpo"]["queries"]
    # the baselines score the final x0 only: one query per trajectory
    assert s["ddpo"]["queries"] == s["grpo"]["queries"] == s["nft"]["queries"] == s["ddpo"]["trajectories"]
    # equal training time: every method's snapshot within the fastest method's training time, from the same runs
    assert {f"{m}_eq_time" for m in ("sdpo", "ddpo", "ddpo_pytorch", "grpo", "nft")} <= set(s)
    assert all(1 <= s[f"{m}_eq_time"]["epochs"] <= 3 for m in ("sdpo", "grpo", "nft"))
    assert min(s[f"{m}_eq_time"]["epochs"] for m in ("sdpo", "ddpo", "ddpo_pytorch", "grpo", "nft")) < 3 or len(
        {round(s[m]["median_epoch_seconds"], 6) for m in ("sdpo", "ddpo", "grpo", "nft")}) == 1
    for other in ("ddpo", "ddpo_pytorch", "grpo", "nft"):
        for budget in ("equal_traj", "equal_queries", "equal_time"):
            assert set(s[f"sdpo_minus_{other}_{budget}"]["diff"]) == {"1", "2"}
    runs = by_t["runs"]
    assert len(runs["sdpo_eq_queries"][0]["history"]) == 1 and len(runs["grpo"][0]["history"]) == 3
    assert (tmp_path / "curves_T3.png").stat().st_size > 10_000
    md = (tmp_path / "paper_regime.md").read_text()
    assert "Equal reward queries" in md and "Equal training time" in md and "Time to quality" in md and "GRPO" in md
    assert "## Trained at T = 3" in proc.stdout
    # bench/paired.py on the same result: its SDPO - GRPO is the report's own, seed by seed
    out = tmp_path / "paired.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "paired.py"), str(tmp_path / "summary.json"), "sdpo",
                           "grpo", "nft", "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    paired = json.loads(out.read_text())["diff"]
    for n in ("1", "2"):
        assert paired["grpo"][n]["values"] == pytest.approx(s["sdpo_minus_grpo_equal_traj"]["diff"][n]["values"])
        assert paired["nft"][n]["values"] == pytest.approx(s["sdpo_minus_nft_equal_traj"]["diff"][n]["values"])
    assert "| 2 |" in proc.stdout and "sdpo - nft" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("where", ["train_epoch", "light_eval"])
def test_interrupted_benchmark_run_resumes_where_it_stopped(tiny_base, tmp_path, monkeypatch, where):
    # a stop in epoch 2 of 3 (in its updates, or in the light evaluation after them), then the same
    # call again: the run resumes from its epoch-1 checkpoint, keeps the rows of epochs 0 and 1, and
    # ends with the weights of a run that was never stopped
    sys.path.insert(0, str(ROOT / "bench"))
    import common
    from safetensors.torch import load_file

    from sdpo_core.training.trainer import Trainer

    spec = common.RunSpec("r", "tiny-random", [f"model.pretrained={tiny_base}", "evaluate.num_prompts=2"], 0, 3)
    straight = common.train_run(spec, run_root=tmp_path / "a")
    real = Trainer.train_epoch

    def stop_in_epoch_2(self, samples, epoch):
        if epoch == 2 and where == "train_epoch":
            raise KeyboardInterrupt
        if epoch == 2:  # the light eval of epoch 2 comes next (the bench callback's on_epoch_end)
            bench = next(cb for cb in self.callbacks.callbacks if hasattr(cb, "light_eval"))
            bench.light_eval = lambda trainer: (_ for _ in ()).throw(KeyboardInterrupt())
        return real(self, samples, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", stop_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        common.train_run(spec, run_root=tmp_path / "b")
    monkeypatch.setattr(Trainer, "train_epoch", real)
    run_dir = next((tmp_path / "b").glob("r-*"))
    assert [json.loads(x)["epoch"] for x in (run_dir / "history.jsonl").read_text().splitlines()] == [0, 1]
    resumed = common.train_run(spec, run_root=tmp_path / "b")
    assert [h["epoch"] for h in resumed["history"]] == [0, 1, 2]
    assert [h["queries_cum"] for h in resumed["history"]] == [h["queries_cum"] for h in straight["history"]]
    assert [h["light"] for h in resumed["history"]] == [h["light"] for h in straight["history"]]
    weights = "pytorch_lora_weights.safetensors"
    a, b = load_file(Path(straight["final"]) / weights), load_file(Path(resumed["final"]) / weights)
    assert a.keys() == b.keys() and all(torch_equal(a[k], b[k]) for k in a)


def torch_equal(x, y) -> bool:
    import torch

    return bool(torch.equal(x, y))
