"""Shared harness of the training benchmarks (``alignment.py``, ``ablations.py``).

One training run = ``sdpo_core.training.trainer.Trainer`` as ``sdpo train`` runs it, plus, after every
``light_every`` epochs, a light evaluation (mean reward of the eval prompts at each
``evaluate.steps`` count, fixed seeds, with the model being trained) and optional snapshots of the
weights in the ``sdpo evaluate`` format. Final numbers come from ``sdpo_core.evaluation.evaluate.evaluate``
(the ``sdpo evaluate`` stage: base vs trained on the held-out prompts, fixed seeds).

Runs are cached under ``runs/bench/<name>-<hash>/record.json`` (``runs/`` is git-ignored): the
hash covers the resolved config (pipelines.yaml defaults + overrides, seed, epochs) and the
harness settings, so a benchmark re-run, or another benchmark asking for the same run, reuses
it, and a change of the pipeline's defaults retrains. Pass ``fresh=True``
(``--fresh``) to retrain. A run checkpoints every epoch and appends each epoch's row (timings,
queries, light eval) to ``history.jsonl``: a benchmark stopped half-way resumes the run it was
in from its last checkpoint (the trainer's bit-exact resume) and keeps the rows before it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUN_ROOT = ROOT / "runs" / "bench"
PIPELINES = {"file": ROOT / "pipelines.yaml"}  # frozen per benchmark process by freeze_pipelines()
HARNESS_VERSION = 2  # bump when a change here invalidates cached runs
log = logging.getLogger("bench")


@dataclass
class RunSpec:
    """One training run: a pipeline, config overrides, a seed and a number of epochs."""

    name: str
    pipeline: str
    overrides: list[str]
    seed: int
    epochs: int
    light_every: int = 1
    light_samples_per_prompt: int = 1
    snapshots: list[int] = field(default_factory=list)  # epoch counts (1-based) to save and evaluate

    def training_config(self) -> dict:
        """The resolved config minus what does not change training or the light eval."""
        resolved = self.config().to_dict()
        resolved["evaluate"] = {k: resolved["evaluate"][k] for k in ("steps", "seed")}  # the light eval's
        for section in ("tracking", "register"):
            resolved.pop(section)
        return resolved

    def key(self) -> str:
        """Hash of the RESOLVED training config (so a change of pipelines.yaml defaults is a new run)
        and of the harness settings; final-evaluation settings are checked by ``final_eval``."""
        resolved = self.training_config()
        payload = json.dumps(
            {
                "v": HARNESS_VERSION,
                "config": resolved,
                "light": [self.light_every, self.light_samples_per_prompt],
                "snapshots": sorted(self.snapshots),
            },
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:10]

    def config(self, extra: list[str] | None = None):
        from sdpo_core.config import load_config

        return load_config(
            self.pipeline,
            [
                "tracking.backend=none",
                f"seed={self.seed}",
                f"train.epochs={self.epochs}",
                # a checkpoint every epoch: an interrupted benchmark resumes its run (train_run)
                "train.checkpoint_every=1",
                "train.keep_checkpoints=1",
                *self.overrides,
                *(extra or []),
            ],
            PIPELINES["file"],
        )


def freeze_pipelines(out_dir: Path) -> Path:
    """Copy pipelines.yaml into ``out_dir`` and read every config of this process from the copy:
    other people edit the defaults while a long benchmark runs, and its runs must not mix them."""
    import shutil

    out_dir.mkdir(parents=True, exist_ok=True)
    frozen = out_dir / "pipelines.snapshot.yaml"
    shutil.copyfile(ROOT / "pipelines.yaml", frozen)
    PIPELINES["file"] = frozen
    return frozen


def eval_prompts(cfg) -> list[str]:
    from sdpo_core.prompts import load_train_eval

    return load_train_eval(cfg.prompts.source, cfg.prompts.eval_fraction, cfg.prompts.seed)[1]


def _bench_callback_class():
    from sdpo_core.families.loading import save_trained
    from sdpo_core.training.callbacks import TrainerCallback

    class BenchCallback(TrainerCallback):
        """A light evaluation and snapshots after epochs, and a reward-query count, through the
        trainer's public hooks.

        ``on_epoch_end`` runs after ``time/epoch`` is measured, so training time excludes it.
        """

        def __init__(self, spec: RunSpec, run_dir: Path, cfg) -> None:
            self.spec, self.bench_dir, self.cfg = spec, run_dir, cfg
            self.history_path = run_dir / "history.jsonl"
            self.queries = 0
            prompts = eval_prompts(cfg)
            s = spec.light_samples_per_prompt
            self.light_prompts = [p for p in prompts for _ in range(s)]
            self.light_seeds = [cfg.evaluate.seed + i for i in range(len(self.light_prompts))]
            self.history: list[dict] = []

        @torch.no_grad()
        def light_eval(self, trainer) -> dict[str, float]:
            """Mean reward of the eval prompts at each evaluate.steps count, with the current weights."""
            from sdpo_core.generate import generate

            denoiser = trainer.acc.unwrap_model(trainer.denoiser)
            was_training = denoiser.training
            denoiser.eval()
            out = {}
            with trainer.weights.exported():  # the EMA when train.ema_decay keeps one, as final/ holds
                for n in self.cfg.evaluate.steps:
                    images = generate(trainer.family, self.light_prompts, self.light_seeds, n, self.cfg)
                    out[str(n)] = float(trainer.reward_fn(images, self.light_prompts).float().mean())
            denoiser.train(was_training)
            return out

        def on_rewards(self, trainer, epoch: int, scored) -> None:
            self.queries += scored.queried

        def on_epoch_end(self, trainer, epoch: int, metrics: dict[str, float]) -> None:
            done = epoch + 1
            row = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
            row["queries_cum"] = self.queries
            if done % self.spec.light_every == 0 or done == self.cfg.train.epochs:
                row["light"] = self.light_eval(trainer)
            if done in self.spec.snapshots and done != self.cfg.train.epochs:
                with trainer.weights.exported():
                    save_trained(
                        trainer.family,
                        trainer.acc.unwrap_model(trainer.denoiser),
                        self.bench_dir / f"epoch_{done}",
                        self.cfg.model.finetune,
                        base=self.cfg.model.pretrained,
                    )
            self.history.append(row)
            with open(self.history_path, "a", encoding="utf-8") as fh:  # a row per epoch: what a resume keeps
                fh.write(json.dumps({**row, "epoch": epoch}) + "\n")

        def on_run_start(self, trainer, start_epoch: int) -> None:
            """After the trainer's resume: the rows and the query count of the epochs it keeps."""
            rows = []
            if self.history_path.is_file():
                for line in self.history_path.read_text(encoding="utf-8").splitlines():
                    try:
                        rows.append(json.loads(line))
                    except ValueError:  # a half-written last line
                        break
            self.history = [r for r in rows if r.get("epoch", 1e9) < start_epoch]
            if len(self.history) != start_epoch:  # rows lost (never on a clean stop): train those epochs again
                raise RuntimeError(f"{self.history_path}: {len(self.history)} rows for {start_epoch} resumed epochs; "
                                   f"delete {self.bench_dir} to retrain this run")
            self.queries = self.history[-1]["queries_cum"] if self.history else 0
            self.history_path.write_text("".join(json.dumps(r) + "\n" for r in self.history), encoding="utf-8")
            if start_epoch:
                log.info("%s: resumed at epoch %d", self.spec.name, start_epoch)

    return BenchCallback


def train_run(spec: RunSpec, fresh: bool = False, run_root: Path = RUN_ROOT) -> dict:
    """Train ``spec`` (or reuse its cached record); returns the record (see module docstring)."""
    import shutil

    from sdpo_core.tiny.build import ensure_base

    run_dir = run_root / f"{spec.name}-{spec.key()}"
    record_path = run_dir / "record.json"
    if record_path.is_file() and not fresh:
        log.info("reusing %s", run_dir)
        return json.loads(record_path.read_text())
    if not fresh and (found := _compatible_run(spec, run_root)) is not None:
        return found
    if fresh:
        shutil.rmtree(run_dir, ignore_errors=True)
    cfg = spec.config()
    ensure_base(cfg)
    start = time.perf_counter()
    from sdpo_core.training.trainer import Trainer

    bench = _bench_callback_class()(spec, run_dir, cfg)
    tr = Trainer(cfg, run_dir / "train", callbacks=[bench])
    base_path = run_dir / "light_base.json"
    if base_path.is_file():
        light_base = json.loads(base_path.read_text())
    else:
        light_base = bench.light_eval(tr)
        run_dir.mkdir(parents=True, exist_ok=True)
        base_path.write_text(json.dumps(light_base) + "\n")
    final = tr.run(resume=(run_dir / "train").is_dir())  # a run stopped half-way goes on
    record = {
        "name": spec.name,
        "key": spec.key(),
        "pipeline": spec.pipeline,
        "overrides": spec.overrides,
        "seed": spec.seed,
        "epochs": spec.epochs,
        "method": cfg.train.method,
        "trajectories_per_epoch": 2 * cfg.sample.batch_size * cfg.sample.num_batches_per_epoch,
        "train_steps": cfg.sample.num_steps,
        "light_base": light_base,
        "history": bench.history,
        "train_seconds": sum(r["time/epoch"] for r in bench.history),
        "queries": bench.queries,
        "wall_seconds": time.perf_counter() - start,
        "final": str(final),
        "snapshots": {str(e): str(run_dir / f"epoch_{e}") for e in spec.snapshots if e != spec.epochs},
        "threads": torch.get_num_threads(),
        "config": cfg.to_dict(),
        "light": [spec.light_every, spec.light_samples_per_prompt],
    }
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def _compatible_run(spec: RunSpec, run_root: Path) -> dict | None:
    """A cached run of the same training config and light eval that saved (at least) the
    snapshots ``spec`` asks for: e.g. a DDPO run saved with a snapshot serves a request without."""
    wanted = {str(e) for e in spec.snapshots if e != spec.epochs}
    config = spec.training_config()
    for path in sorted(run_root.glob(f"{spec.name}-*/record.json")):
        rec = json.loads(path.read_text())
        light = rec.get("light", [spec.light_every, spec.light_samples_per_prompt])
        cached = dict(rec.get("config", {}))
        if not cached:
            continue
        cached["evaluate"] = {k: cached["evaluate"][k] for k in ("steps", "seed")}
        for section in ("tracking", "register"):
            cached.pop(section, None)
        if (
            cached == without_new_defaults(config, cached)
            and light == [spec.light_every, spec.light_samples_per_prompt]
            and wanted <= set(rec["snapshots"])
        ):
            log.info("reusing %s (same training config)", path.parent)
            return rec
    return None


def without_new_defaults(config: dict, cached: dict) -> dict:
    """``config`` (a resolved config's dict) less the keys that ``cached`` (one recorded by an older
    version) lacks and that hold their field's default: an option added since, left at its default,
    trains as before, so the cached run still serves."""
    from sdpo_core.config import Config

    return _without_new_defaults(config, cached, Config)


def _without_new_defaults(config: dict, cached: dict, model) -> dict:
    from pydantic import BaseModel

    out = {}
    for k, v in config.items():
        field_ = model.model_fields.get(k) if model is not None else None
        if k not in cached and field_ is not None and not field_.is_required():
            default = field_.get_default(call_default_factory=True)
            if (default.model_dump() if isinstance(default, BaseModel) else default) == v:
                continue
        if k in cached and isinstance(v, dict) and isinstance(cached[k], dict):
            sub = field_.annotation if field_ is not None else None
            v = _without_new_defaults(v, cached[k], sub if isinstance(sub, type) and issubclass(sub, BaseModel)
                                      else None)
        out[k] = v
    return out


def final_eval(spec: RunSpec, model_dir: str | Path, out_dir: Path, fresh: bool = False) -> dict:
    """``sdpo evaluate`` of a trained model directory (cached in ``out_dir/eval.json``)."""
    from sdpo_core.evaluation.evaluate import evaluate

    path = out_dir / "eval.json"
    cfg = spec.config()
    if path.is_file() and not fresh:
        cached = json.loads(path.read_text())
        have = set(next(iter(cached["steps"].values()))["trained"].get("metrics", {}))
        same = all(
            cached[k] == getattr(cfg.evaluate, k) for k in ("num_prompts", "samples_per_prompt", "seed")
        )
        if same and set(cfg.evaluate.metrics) <= have:  # else the eval config changed: evaluate again
            return cached
    return evaluate(cfg, cfg.model.pretrained, str(model_dir), eval_prompts(cfg), out_dir)


def seed_ci(values: list[float]) -> dict[str, float]:
    """Mean over seeds with its 95% t-interval (``sdpo_core.evaluation.evaluate.mean_ci``); one seed: the
    mean alone (``lo``/``hi`` NaN, ``n`` 1), which ``fmt_ci`` prints as such."""
    from sdpo_core.evaluation.evaluate import mean_ci

    if len(values) == 1:
        return {"mean": values[0], "lo": float("nan"), "hi": float("nan"), "n": 1, "values": values}
    mean, lo, hi = mean_ci(torch.tensor(values, dtype=torch.float64))
    return {"mean": mean, "lo": lo, "hi": hi, "n": len(values), "values": values}


def fmt_ci(s: dict[str, float], digits: int = 3, sign: bool = False) -> str:
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    if s.get("n") == 1:
        return f"{f.format(s['mean'])} (1 seed)"
    return f"{f.format(s['mean'])} [{f.format(s['lo'])}, {f.format(s['hi'])}]"


def machine_info() -> dict:
    import platform

    import diffusers

    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "load_avg_1min": os.getloadavg()[0],
    }


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("diffusers", "transformers", "accelerate", "sdpo_core.evaluation.evaluate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
    except ImportError:
        pass
