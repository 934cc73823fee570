"""Cost of one SDPO epoch against its compute floor, on the tiny model (CPU).

For each size (B prompts per epoch, T denoising steps) it builds a ``Trainer`` and times whole
epochs exactly as ``Trainer.run`` does them (``sample_epoch`` + ``train_epoch`` + checkpoint),
split into sampling, VAE decode, reward, training, checkpoint and everything else. Each measured
epoch follows an unmeasured one, so that it bears the previous epoch's checkpoint write as
``Trainer.run`` does (in a background thread with ``train.async_checkpoint``, the default). In the same
process, on the same shapes and the same (LoRA-adapted) UNet, it times the bare model calls the
epoch needs: T UNet forwards at 2B for sampling, the training forward+backward passes (one per
train batch and step position, 2b items each), one VAE decode of the queried x0 and one reward
call. ``floor ratio`` = epoch time / floor time (1.0 would be a loop that costs nothing).

One sampling batch per epoch (``sample.num_batches_per_epoch=1``), so that the reward worker
thread does not overlap sampling and the split adds up to the wall time.

Run::

    .venv/bin/python bench/cost.py                       # T and B sweeps + profile, ~3-5 min on 2 cores
    .venv/bin/python bench/cost.py --smoke               # two tiny sizes, no profile, seconds
    .venv/bin/python bench/cost.py --steps 1 4 50 --batches 4 --profile-size 4x50
    .venv/bin/python bench/cost.py --compare before1.json,before2.json after1.json,after2.json
    bash bench/cost_ab.sh REV    # this tree against commit REV, run alternately (before/after)

Writes ``--out`` (default bench/results/cost.json), ``cost_profile.txt`` beside it (cProfile and
torch.profiler tables of one epoch) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars of the trainer: noise in a benchmark log

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STEPS = [1, 2, 4, 8, 16, 32, 50]
DEFAULT_BATCHES = [2, 4, 8, 16, 32]


# ----------------------------------------------------------------------------- measuring
class PeakRSS:
    """Peak resident memory of this process while the block runs, sampled by a thread (psutil);
    falls back to the growth of ``ru_maxrss`` (a high-water mark, so only growth shows)."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self.base = interval, 0, 0
        try:
            import psutil

            self._proc = psutil.Process()
        except ImportError:
            self._proc = None

    def _rss(self) -> int:
        if self._proc is not None:
            return self._proc.memory_info().rss
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def reward_counter():
    """A trainer callback summing the reward jobs' decode and reward seconds and decoded states."""
    from sdpo_core.training.callbacks import TrainerCallback

    class RewardCounter(TrainerCallback):
        def __init__(self) -> None:
            self.reset()

        def reset(self) -> None:
            self.decode_seconds, self.reward_seconds, self.decoded = 0.0, 0.0, 0

        def on_rewards(self, trainer, epoch: int, scored) -> None:
            self.decode_seconds += scored.decode_seconds
            self.reward_seconds += scored.reward_seconds
            self.decoded += scored.decoded

    return RewardCounter()


# ----------------------------------------------------------------------------- one size
def make_trainer(base: str, batch: int, steps: int, train_batch: int, run_dir: Path, extra: list[str]):
    from sdpo_core.config import load_config
    from sdpo_core.training.trainer import Trainer

    cfg = load_config(
        "tiny-random",
        [
            f"model.pretrained={base}",
            "tracking.backend=none",
            f"sample.num_steps={steps}",
            f"sample.batch_size={batch}",
            "sample.num_batches_per_epoch=1",
            f"train.batch_size={min(train_batch, batch)}",
            "train.keep_checkpoints=1",
            *extra,
        ],
        ROOT / "pipelines.yaml",
    )
    counter = reward_counter()
    tr = Trainer(cfg, run_dir, callbacks=[counter])
    tr.run_dir.mkdir(parents=True, exist_ok=True)
    return tr, counter


def epoch_once(tr, epoch: int, counter) -> dict[str, float]:
    """One epoch as ``Trainer.run`` does it, timed by part (``counter``: the trainer's ``reward_counter``)."""
    counter.reset()
    start = time.perf_counter()
    rollout = tr.sample_epoch(epoch)
    samples, stats = rollout.samples, rollout.stats
    t_sampled = time.perf_counter()
    stats.update(tr.train_epoch(samples, epoch))
    t_trained = time.perf_counter()
    tr.save_checkpoint(epoch)
    end = time.perf_counter()
    parts = {
        "sampling": stats["time/sampling"],
        "decode": counter.decode_seconds,
        "reward": counter.reward_seconds,
        "training": stats["time/training"],
        "checkpoint": end - t_trained,
    }
    parts["other"] = (end - start) - sum(parts.values())
    parts["epoch"] = end - start
    parts["epoch_no_checkpoint"] = t_trained - start
    parts["reward_wait"] = stats["time/reward_wait"]
    parts["sample_epoch"] = t_sampled - start
    parts["queries"] = counter.decoded
    return parts


class Floor:
    """The bare model calls an epoch needs, on the same shapes, modules and process.

    ``measure()`` makes as many calls of each kind as the epoch makes (after ``warm()``);
    ``run_size`` interleaves it with the measured epochs, so that both see the same machine load
    (other jobs share these 2 cores).
    """

    def __init__(self, tr, decoded: int):
        cfg = tr.cfg
        b, tb = cfg.sample.batch_size, cfg.train.batch_size
        c, h, w = tr.latent_shape
        self.tr, self.unet = tr, tr.acc.unwrap_model(tr.denoiser)
        self.t = cfg.sample.num_steps
        self.n_train = self.t * (b // tb)  # step positions x train batches (full timestep fraction)
        e1 = tr.family.encode(["a handwritten digit 7"])
        x_s, e_s, ts = torch.randn(2 * b, c, h, w), e1.repeat(2 * b), tr.timesteps[0]
        x_t, e_t = torch.randn(2 * tb, c, h, w), e1.repeat(2 * tb)
        t_t = tr.timesteps[torch.zeros(2 * tb, dtype=torch.long)]
        sample_fn, train_fn = tr.denoise_fn(self.unet), tr.denoise_fn(tr.denoiser)
        lat = torch.randn(max(decoded, 1), c, h, w)
        images = tr.family.decode(lat)
        prompts = ["a handwritten digit 7"] * len(images)

        def sample_call():
            with torch.no_grad():
                sample_fn(x_s, ts, e_s)

        def train_call():
            train_fn(x_t, t_t, e_t).float().square().mean().backward()
            for p in tr.trainable:
                p.grad = None

        self.calls = {
            "unet_forward_2B": sample_call,
            "unet_fwd_bwd_2b": train_call,
            "decode": lambda: tr.family.decode(lat),
            "reward": lambda: tr.reward_fn(images, prompts),
        }

    def _time(self, name: str, count: int = 1) -> float:
        """Wall time of ``count`` calls (as many as the epoch makes: same exposure to noise)."""
        self.unet.train(name == "unet_fwd_bwd_2b")
        start = time.perf_counter()
        for _ in range(count):
            self.calls[name]()
        elapsed = time.perf_counter() - start
        self.unet.eval()
        return elapsed

    def warm(self) -> None:
        for name in self.calls:
            self._time(name)

    def measure(self) -> dict[str, float]:
        floor = {
            "sampling_unet": self._time("unet_forward_2B", self.t),
            "training_unet": self._time("unet_fwd_bwd_2b", self.n_train),
            "decode": self._time("decode"),
            "reward": self._time("reward"),
            "train_calls": self.n_train,
        }
        floor["unet_forward_2B"] = floor["sampling_unet"] / self.t
        floor["unet_fwd_bwd_2b"] = floor["training_unet"] / self.n_train
        floor["total"] = floor["sampling_unet"] + floor["training_unet"] + floor["decode"] + floor["reward"]
        return floor


def run_size(
    base: str, batch: int, steps: int, train_batch: int, repeats: int, work: Path, extra: list[str]
) -> dict:
    tr, counter = make_trainer(base, batch, steps, train_batch, work / f"b{batch}_t{steps}", extra)
    warm = epoch_once(tr, 0, counter)  # warm-up: first-call allocations, thread start
    tr.wait_checkpoints()
    floor = Floor(tr, int(warm["queries"]))
    floor.warm()
    runs, floors, mems = [], [], []
    for e in range(repeats):
        # steady state: the measured epoch runs while the previous epoch's checkpoint is written
        # (in the background with train.async_checkpoint, as in Trainer.run)
        epoch_once(tr, 2 * e + 1, counter)
        with PeakRSS() as mem:
            runs.append(epoch_once(tr, 2 * e + 2, counter))
        mems.append(mem.delta_mb)
        tr.wait_checkpoints()  # nothing of the epoch's own runs into the floor measurement
        floors.append(floor.measure())
    parts = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    fl = {k: statistics.median(f[k] for f in floors) for k in floors[0]}
    tr.close()
    row = {
        "batch": batch,
        "steps": steps,
        "trajectories": 2 * batch,
        "train_batch": tr.cfg.train.batch_size,
        "parts": parts,
        "floor": fl,
        "peak_rss_delta_mb": max(mems),
        "floor_ratio": parts["epoch"] / fl["total"],
        "floor_ratio_no_checkpoint": parts["epoch_no_checkpoint"] / fl["total"],
        "sampling_ratio": parts["sampling"] / fl["sampling_unet"],
        "training_ratio": parts["training"] / fl["training_unet"],
        "queries_per_trajectory": parts["queries"] / (2 * batch),
    }
    print(
        f"B={batch:3d} T={steps:3d}: epoch {parts['epoch']:.3f}s floor {fl['total']:.3f}s "
        f"ratio {row['floor_ratio']:.2f} (sampling x{row['sampling_ratio']:.2f}, training "
        f"x{row['training_ratio']:.2f}) queries/traj {row['queries_per_trajectory']:.2f} "
        f"peak +{row['peak_rss_delta_mb']:.0f} MB",
        flush=True,
    )
    return row


# ----------------------------------------------------------------------------- profile
def profile_epoch(base: str, batch: int, steps: int, train_batch: int, work: Path, extra: list[str]) -> str:
    """cProfile (Python-level) and torch.profiler (op-level) tables of one warm epoch."""
    tr, counter = make_trainer(base, batch, steps, train_batch, work / f"profile_b{batch}_t{steps}", extra)
    epoch_once(tr, 0, counter)
    tr.wait_checkpoints()
    prof = cProfile.Profile()
    prof.enable()
    epoch_once(tr, 1, counter)
    prof.disable()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    buf.write(f"# cProfile of one warm epoch, B={batch} T={steps} (sorted by tottime)\n")
    stats.sort_stats("tottime").print_stats(30)
    buf.write("\n# the same, sorted by cumulative time\n")
    stats.sort_stats("cumulative").print_stats(40)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as tprof:
        epoch_once(tr, 2, counter)
    tr.wait_checkpoints()
    buf.write(f"\n# torch.profiler, one warm epoch, B={batch} T={steps} (sorted by self CPU time)\n")
    buf.write(tprof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    tr.close()
    return buf.getvalue()


# ----------------------------------------------------------------------------- report
def markdown(rows: list[dict]) -> str:
    head = (
        "| B (prompts) | T | trajectories | queries/traj | epoch s | sampling | decode | reward | training | "
        "checkpoint | other | floor s | floor ratio | sampling / UNet fwd | training / fwd+bwd | peak RSS +MB |"
    )
    lines = [head, "|" + "---:|" * 16]
    for r in rows:
        p, f = r["parts"], r["floor"]
        lines.append(
            f"| {r['batch']} | {r['steps']} | {r['trajectories']} | {r['queries_per_trajectory']:.2f} | "
            f"{p['epoch']:.3f} | {p['sampling']:.3f} | {p['decode']:.3f} | {p['reward']:.3f} | "
            f"{p['training']:.3f} | {p['checkpoint']:.3f} | {p['other']:.3f} | {f['total']:.3f} | "
            f"{r['floor_ratio']:.2f} | {r['sampling_ratio']:.2f} | {r['training_ratio']:.2f} | "
            f"{r['peak_rss_delta_mb']:.0f} |"
        )
    return "\n".join(lines)


def compare(before: list[Path], after: list[Path]) -> str:
    """Markdown table of two sets of result files (e.g. two code versions run alternately):
    per size, the median over files of the epoch time, checkpoint time and floor ratio."""

    def load(paths: list[Path]) -> dict[tuple[int, int], list[dict]]:
        rows: dict[tuple[int, int], list[dict]] = {}
        for path in paths:
            result = json.loads(Path(path).read_text())
            for r in result["steps_sweep"] + result["batch_sweep"]:
                rows.setdefault((r["batch"], r["steps"]), []).append(r)
        return rows

    b_rows, a_rows = load(before), load(after)
    med = statistics.median
    lines = [
        "| B | T | epoch s before | epoch s after | checkpoint s before | checkpoint s after | "
        "floor ratio before | floor ratio after | epoch after / before |",
        "|" + "---:|" * 9,
    ]
    for key in sorted(set(b_rows) & set(a_rows), key=lambda k: (k[1], k[0])):
        b, a = b_rows[key], a_rows[key]
        eb, ea = med(r["parts"]["epoch"] for r in b), med(r["parts"]["epoch"] for r in a)
        lines.append(
            f"| {key[0]} | {key[1]} | {eb:.3f} | {ea:.3f} | {med(r['parts']['checkpoint'] for r in b):.4f} | "
            f"{med(r['parts']['checkpoint'] for r in a):.4f} | {med(r['floor_ratio'] for r in b):.2f} | "
            f"{med(r['floor_ratio'] for r in a):.2f} | {ea / eb:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, nargs="+", default=DEFAULT_STEPS, help="T sweep (at --sweep-batch)")
    ap.add_argument(
        "--batches", type=int, nargs="+", default=DEFAULT_BATCHES, help="B sweep (at --sweep-steps)"
    )
    ap.add_argument("--sweep-batch", type=int, default=4, help="B of the T sweep")
    ap.add_argument("--sweep-steps", type=int, default=4, help="T of the B sweep")
    ap.add_argument("--train-batch", type=int, default=4, help="pairs per backward (train.batch_size)")
    ap.add_argument("--repeats", type=int, default=3, help="measured epochs per size (after one warm-up)")
    ap.add_argument("--profile-size", default="4x50", help="BxT of the profiled epoch; 'none' to skip")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--set", action="append", default=[], help="extra config override key=value")
    ap.add_argument(
        "--base", default=None, help="tiny pipeline dir (default: a random tiny one built in a temp dir)"
    )
    ap.add_argument("--out", default="bench/results/cost.json")
    ap.add_argument("--smoke", action="store_true", help="two tiny sizes, one repeat, no profile (CI)")
    ap.add_argument(
        "--compare", nargs=2, metavar=("BEFORE", "AFTER"), default=None,
        help="no run: compare result files, each argument a comma-separated list (see bench/cost_ab.sh)",
    )
    args = ap.parse_args(argv)
    if args.compare:
        before, after = ([Path(x) for x in arg.split(",")] for arg in args.compare)
        print(compare(before, after))
        return 0
    if args.smoke:
        args.steps, args.batches, args.repeats, args.profile_size = [1, 3], [2], 1, "none"
        args.sweep_batch, args.sweep_steps, args.train_batch = 2, 2, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sdpo-cost-") as tmp:
        work = Path(tmp)
        base = args.base
        if base is None:
            from sdpo_core.tiny.build import build_random_tiny

            base = str(build_random_tiny(work / "base", seed=0))
        load = os.getloadavg()[0]
        t_rows = [
            run_size(base, args.sweep_batch, t, args.train_batch, args.repeats, work, args.set)
            for t in args.steps
        ]
        b_rows = [
            run_size(base, b, args.sweep_steps, args.train_batch, args.repeats, work, args.set)
            for b in args.batches
        ]
        profile_text = None
        if args.profile_size != "none":
            pb, pt = (int(v) for v in args.profile_size.lower().split("x"))
            profile_text = profile_epoch(base, pb, pt, args.train_batch, work, args.set)
    result = {
        "benchmark": "cost",
        "smoke": args.smoke,
        "pipeline": "tiny-random (the digits-tiny shapes)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "load_avg_1min_before": load,
        "argv": sys.argv[1:],
        "steps_sweep": t_rows,
        "batch_sweep": b_rows,
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    if profile_text is not None:
        (out.parent / "cost_profile.txt").write_text(profile_text)
    print(f"\n## T sweep (B={args.sweep_batch})\n" + markdown(t_rows))
    print(f"\n## B sweep (T={args.sweep_steps})\n" + markdown(b_rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
