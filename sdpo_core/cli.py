"""The ``sdpo`` command.

    sdpo run --pipeline digits-tiny            # prepare, base, train, evaluate
    sdpo train --pipeline NAME [--run-dir DIR] [--set k=v ...] [--resume]
    sdpo generate --model DIR --prompt "a seven" --steps 2 --out seven.png
    sdpo register --pipeline NAME              # MLflow registry; champion only if it beats the current one
    sdpo sync --run-dir DIR                    # send what MLflow missed while it was down
    sdpo promote NAME --version N | --rollback # move NAME@champion by hand, checked and recorded
    sdpo config show NAME [--json]
    sdpo config docs [--write docs/config.md]  # the config key reference, from sdpo_core/config.py

Prefect/DVC commands (stack, deploy, version) come from ``flows.commands`` when it is installed,
looked up by name (``COMMAND_PLUGINS``): nothing in sdpo_core imports flows.

Exit codes: 0 success, 2 bad input (a clear message, nothing written; also: the run directory is
in use by another run), 1 anything else (e.g. a checkpoint that could not be written: disk full;
training stopped on non-finite updates, naming the last good checkpoint),
130 interrupted by SIGINT (Ctrl-C), 143 stopped by SIGTERM (what Prefect sends on cancel). An
interrupted ``train`` or ``run`` keeps its last complete checkpoint and says how to resume.

Under ``torchrun`` / ``accelerate launch`` (N processes, on one machine or several) every process
runs the same command; rank 0 alone prints its result, logs at INFO and reports errors that every
rank shares (``rundir/ranks.py``); the other ranks log only warnings and errors, prefixed
``[rank N]`` (everything with ``-v``), and stop quietly on a signal. The launcher forwards SIGINT /
SIGTERM to every process (torchrun: the same signal, SIGKILL 30 s later); each stops as one
process does, rank 0 keeping the last complete checkpoint. The launcher's own exit status is 1 when
any process fails or is stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import shlex
import signal
import sys
from pathlib import Path

from sdpo_core.config import (
    ConfigError,
    ModelConfig,
    SampleConfig,
    batch_plan,
    check_steps,
    dump_yaml,
    load_config,
    pipeline_names,
    validate_section,
)
from sdpo_core.prompts import PromptError
from sdpo_core.rundir import ranks
from sdpo_core.rundir.lock import RunLockedError
from sdpo_core.rundir.outputs import export_train_metrics
from sdpo_core.rundir.paths import default_run_dir
from sdpo_core.stages import STAGES, run_pipeline
from sdpo_core.tracking.sync import sync_run_dir
from sdpo_core.tracking.trackers import TrackingUnavailable

log = logging.getLogger("sdpo")

BAD_INPUT = 2
MODEL_COMMANDS = {"run", "base", "train", "evaluate", "generate"}  # load a model: quiet diffusers first
TRAIN_COMMANDS = {"run", "train"}


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt is for SIGINT."""


STOP_SIGNALS = {signal.SIGINT: ("SIGINT", 130), signal.SIGTERM: ("SIGTERM", 143)}
_received: list[signal.Signals] = []  # the stop signals this process got


def _stop(signum, frame) -> None:
    _received.append(signal.Signals(signum))
    raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    """Every error a user can cause, and only those: exit 2 with its one-line message. Each names the
    file, key or variable, the value and what was expected (config, pipelines and orchestration
    files: ConfigError, flows' SettingsError among them; model directories: ModelLoadError; ...).
    Anything else is a bug: its traceback is printed, exit 1."""
    from sdpo_core.families.hub import ModelLoadError
    from sdpo_core.rewards import RewardError
    from sdpo_core.training.checkpoint import ResumeError

    return (*LIGHT_BAD_INPUT, ModelLoadError, RewardError, ResumeError)


# bad input whose classes are loaded already: reported without importing torch or diffusers first
LIGHT_BAD_INPUT = (ConfigError, PromptError, RunLockedError, TrackingUnavailable, ranks.RunDirNotShared)


def _environment_errors() -> tuple[type[BaseException], ...]:
    from sdpo_core.training.checkpoint import CheckpointWriteError
    from sdpo_core.training.nonfinite import NonFiniteError

    return (CheckpointWriteError, NonFiniteError)


def _setup_logging(verbose: bool) -> None:
    # under a launcher rank 0 logs for the run; the others only what goes wrong on them (all with -v)
    quiet = not ranks.is_main_process()
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO,
        format=f"%(asctime)s %(levelname)s {_rank_prefix()}%(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "alembic", "mlflow", "filelock", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # the libraries read these when first imported (commands that load no model import neither)
    for var, value in (("DIFFUSERS_VERBOSITY", "error"), ("TRANSFORMERS_VERBOSITY", "error"),
                       ("HF_HUB_DISABLE_PROGRESS_BARS", "1")):
        os.environ.setdefault(var, value)


def _rank_prefix() -> str:
    return f"[rank {ranks.rank()}] " if not ranks.is_main_process() else ""


def _error(exc: BaseException) -> None:
    print(f"{_rank_prefix()}error: {exc}", file=sys.stderr)


def _load_cfg(args: argparse.Namespace):
    return load_config(args.pipeline, args.set, Path(args.pipelines))


def _run_dir(args: argparse.Namespace, cfg) -> Path:
    return Path(args.run_dir) if args.run_dir else default_run_dir(cfg.pipeline)


# ---------------------------------------------------------------------------------- commands
def cmd_config_show(args: argparse.Namespace) -> int:
    cfg = _load_cfg(args)
    if args.json:
        print(json.dumps(cfg.to_dict(), indent=2))
    else:
        print(dump_yaml(cfg), end="")
        print(f"# batch plan (1 process): {batch_plan(cfg)}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from sdpo_core.plan import format_budget, plan_budget  # torch / diffusers: only for this command

    cfg = _load_cfg(args)
    gpu = int(args.gpu_memory * 2**30) if args.gpu_memory else None
    print(format_budget(plan_budget(cfg, args.pipeline, args.gpus if args.fsdp else 1), gpu))
    if args.gpus > 1 and not args.fsdp:
        print(f"  {args.gpus} GPUs: each process holds the whole model (DDP), so the budget per GPU is the same; "
              f"--fsdp: the budget with the denoiser sharded over the {args.gpus} GPUs")
    return 0


def cmd_config_list(args: argparse.Namespace) -> int:
    print("\n".join(pipeline_names(Path(args.pipelines))))
    return 0


def cmd_rewards_list(args: argparse.Namespace) -> int:
    from sdpo_core.rewards import available_rewards

    for name, spec in available_rewards().items():
        print(f"{name:22s} range {spec.value_range}\n    {spec.description}")
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    """``sdpo <stage>`` for a stage of ``stages.STAGES`` (``args.stage``)."""
    cfg = _load_cfg(args)
    stage = args.stage
    if stage.name == "train":
        _refuse_if_too_big(cfg, args.pipeline)
    stage.command(cfg, _run_dir(args, cfg) if stage.takes_run_dir else default_run_dir(cfg.pipeline), args)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from sdpo_core.evaluation.plots import save_image_grid
    from sdpo_core.families.loading import MODEL_META, load_family, load_trained, read_model_meta
    from sdpo_core.generate import compute_dtype, default_device, generate_trajectories, policy_for

    # the options are checked before the model loads (seconds to minutes)
    sample = validate_section(
        SampleConfig, {"eta": args.eta, "last_step": args.last_step, "guidance_scale": args.guidance_scale},
        "sdpo generate --eta / --guidance-scale / --last-step")
    check_steps(args.model, None, {"--steps": [args.steps]}, "sdpo generate")
    model, device = Path(args.model), default_device()
    trained = args.lora or (model if (model / MODEL_META).is_file() else None)
    # a model trained in half precision is sampled in it (sdpo_model.json records it), as evaluation does
    dtype = compute_dtype(read_model_meta(trained).get("mixed_precision", "no")) if trained else compute_dtype("no")
    if args.lora:
        family = load_trained(args.lora, base=args.model, device=device, dtype=dtype)
    elif trained:
        family = load_trained(model, device=device, dtype=dtype)
    else:
        family = load_family(args.model, device=device)
    # the training sampler; one generator per image so image i is the same whatever --num-images is
    policy = policy_for(family, args.steps, sample, ModelConfig(pretrained=args.model), dtype)
    seeds = [args.seed + i for i in range(args.num_images)]
    traj = generate_trajectories(family, policy, [args.prompt] * args.num_images, seeds, None)
    images = family.decode(traj.x0[:, -1]).cpu()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    labels = [f"seed {args.seed + i}" for i in range(args.num_images)] if args.num_images > 1 else [args.prompt]
    save_image_grid({args.prompt: images.unsqueeze(0)}, [f"{args.steps} step{'s' if args.steps > 1 else ''}"], labels, out)
    print(out)
    return 0


def cmd_export_metrics(args: argparse.Namespace) -> int:
    cfg = _load_cfg(args)
    print(export_train_metrics(_run_dir(args, cfg)))
    return 0


def cmd_config_docs(args: argparse.Namespace) -> int:
    # imported on use: the docs read the method registry, whose maths imports torch (`--help` stays light)
    from sdpo_core.config_docs import config_markdown

    text = config_markdown()
    if args.write:
        Path(args.write).write_text(text, encoding="utf-8")
        print(args.write)
    else:
        print(text, end="")
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    res = sync_run_dir(args.run_dir)
    state = "complete" if res.complete else "incomplete (the server went away again; run it again)"
    print(f"run {res.run_id} at {res.tracking_uri}: sent epochs {res.metric_steps}, "
          f"{res.artifacts} artifact(s); {state}")
    return 0 if res.complete else 1


def cmd_promote(args: argparse.Namespace) -> int:
    from sdpo_core.tracking.promote import promote  # mlflow

    print(promote(args.name, version=args.version, rollback=args.rollback, reason=args.reason).summary)
    return 0


def _refuse_if_too_big(cfg, name: str) -> None:
    """Exit 2 before training when the budget of ``sdpo plan`` exceeds the detected GPU (no check on the CPU)."""
    from sdpo_core.plan import refuse_if_too_big  # torch / diffusers: training loads them anyway

    refuse_if_too_big(cfg, name)


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load_cfg(args)
    _refuse_if_too_big(cfg, args.pipeline)
    result = run_pipeline(cfg, _run_dir(args, cfg), resume=args.resume)
    print(result.summary)
    return 0


# ---------------------------------------------------------------------------------- parser
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def _add_common(p: argparse.ArgumentParser, run_dir: bool = True) -> None:
    p.add_argument("--pipeline", required=True, help="pipeline name in the pipelines file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.epochs=3 (repeatable)")
    p.add_argument("--pipelines", default="pipelines.yaml", help="pipelines file (default: %(default)s)")
    if run_dir:
        p.add_argument("--run-dir", help="output folder (default: runs/<pipeline>)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdpo", description="Align few-step text-to-image diffusion models with SDPO.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="prepare prompts, build the base model if needed, train and evaluate")
    _add_common(p)
    p.add_argument("--resume", action="store_true", help="continue training from the last checkpoint")
    p.set_defaults(func=cmd_run)

    for stage in STAGES:  # `sdpo prepare`, `sdpo base`, ...: one subcommand per declared stage
        p = sub.add_parser(stage.name, help=stage.description)
        _add_common(p, run_dir=stage.takes_run_dir)
        for option in stage.options:
            p.add_argument(*option.flags, **option.kwargs)
        p.set_defaults(func=cmd_stage, stage=stage)

    p = sub.add_parser("sync", help="send to MLflow what a run kept while its server was down")
    p.add_argument("--run-dir", required=True, help="run folder holding tracking_sync.json")
    p.set_defaults(func=cmd_sync)

    p = sub.add_parser("promote", help="move NAME@champion to a version, or back (checked, recorded on the versions)")
    p.add_argument("name", help="registered model name (register.model_name)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--version", help="the version to make champion")
    which.add_argument("--rollback", action="store_true", help="give champion back to the version it was taken from")
    p.add_argument("--reason", default="", help="why (kept in the versions' record)")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("generate", help="generate images with a base or trained model")
    p.add_argument("--model", required=True, help="base model (dir or hub id) or a trained model dir")
    p.add_argument("--lora", help="trained LoRA dir to apply on --model")
    p.add_argument("--prompt", required=True)
    p.add_argument("--steps", type=_positive_int, default=4, help="denoising steps (>= 1)")
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--guidance-scale", type=float, default=1.0)
    p.add_argument("--last-step", choices=["clamp", "final_alpha"], default="clamp",
                   help="last DDIM step: clamp (stochastic, as trained by default) or final_alpha (diffusers)")
    p.add_argument("--num-images", type=_positive_int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="PNG file to write")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export-metrics", help="RUN_DIR/train_metrics.jsonl -> train_metrics.csv (dvc plots)")
    _add_common(p)
    p.set_defaults(func=cmd_export_metrics)

    p = sub.add_parser("plan", help="the GPU memory budget of a pipeline, from its model configs (no download)")
    _add_common(p, run_dir=False)
    p.add_argument("--gpus", type=_positive_int, default=1, help="GPUs (processes) the run uses")
    p.add_argument("--gpu-memory", type=float, help="GiB per GPU to check the budget against")
    p.add_argument("--fsdp", action="store_true",
                   help="the denoiser sharded with FSDP over --gpus processes (configs/accelerate/fsdp_8gpu.yaml)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("config", help="show resolved pipeline configs")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    c = csub.add_parser("show", help="print the resolved config of a pipeline")
    c.add_argument("pipeline")
    c.add_argument("--json", action="store_true")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    c.add_argument("--pipelines", default="pipelines.yaml")
    c.set_defaults(func=cmd_config_show)
    c = csub.add_parser("list", help="list pipeline names")
    c.add_argument("--pipelines", default="pipelines.yaml")
    c.set_defaults(func=cmd_config_list)
    c = csub.add_parser("docs", help="print the config key reference (docs/config.md) from the config models")
    c.add_argument("--write", metavar="FILE", help="write it to FILE instead (e.g. docs/config.md)")
    c.set_defaults(func=cmd_config_docs)

    p = sub.add_parser("rewards", help="list registered rewards")
    p.set_defaults(func=cmd_rewards_list)

    # its own parser takes every argument (see main); listed here for --help
    sub.add_parser("reward-server", help="serve a reward over HTTP (sdpo reward-server --help for options)")
    _add_plugin_commands(sub)
    return parser


# Modules with ``add_commands(subparsers)`` that add subcommands, looked up by name so that sdpo_core
# never imports them; one that is not installed is skipped, one that fails to import is an error.
COMMAND_PLUGINS = ("flows.commands",)


def _add_plugin_commands(sub: argparse._SubParsersAction) -> None:
    for name in COMMAND_PLUGINS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
                continue  # e.g. sdpo_core installed without flows/
            raise
        module.add_commands(sub)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["reward-server"]:
        from sdpo_core.rewards.server import main as server_main

        return server_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    if args.command in MODEL_COMMANDS:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()  # "Loading pipeline components" bars on every load
    _received.clear()
    previous = {sig: signal.signal(sig, _stop) for sig in STOP_SIGNALS}
    # the command's printed result comes from rank 0 alone
    quiet = open(os.devnull, "w") if not ranks.is_main_process() else None  # noqa: SIM115
    try:
        with contextlib.redirect_stdout(quiet) if quiet else contextlib.nullcontext():
            return int(args.func(args) or 0)
    except ranks.ReportedByRankZero as exc:  # rank 0 prints it
        return BAD_INPUT if isinstance(exc.error, _bad_input_errors()) else 1
    except LIGHT_BAD_INPUT as exc:
        _error(exc)
        return BAD_INPUT
    except _bad_input_errors() as exc:
        _error(exc)
        return BAD_INPUT
    except _environment_errors() as exc:  # no traceback: the message says what happened and what to do
        _error(exc)
        return 1
    except (KeyboardInterrupt, Terminated) as exc:
        return _interrupted(args, argv, signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)
    except Exception:
        if not _received:
            raise
        # under a launcher: a collective broken by another rank that stopped first; the same stop
        return _interrupted(args, argv, _received[0])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if quiet:
            quiet.close()


def _interrupted(args: argparse.Namespace, argv: list[str], sig: signal.Signals) -> int:
    name, code = STOP_SIGNALS[sig]
    if ranks.is_main_process():  # the other ranks stop quietly: rank 0 says where the run stands
        print(_interrupted_message(args, argv, name), file=sys.stderr)
    return code


def _interrupted_message(args: argparse.Namespace, argv: list[str], signame: str) -> str:
    if args.command not in TRAIN_COMMANDS:
        return f"interrupted by {signame}"
    from sdpo_core.training.checkpoint import latest_checkpoint

    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(args.pipeline)
    latest = latest_checkpoint(run_dir)
    again = shlex.join(["sdpo", *argv, *([] if "--resume" in argv else ["--resume"])])
    if ranks.launched():
        again = f"the same launcher command running {again}"
    if latest is None:
        return f"interrupted by {signame} before the first checkpoint: nothing to resume; start again with: {again}"
    return f"interrupted by {signame}: the last complete checkpoint is {latest}; continue with: {again}"


if __name__ == "__main__":
    sys.exit(main())
