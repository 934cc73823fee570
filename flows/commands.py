"""The orchestration subcommands of `sdpo` (added through ``sdpo_core.cli._EXTRA_COMMANDS``)::

    sdpo register --pipeline NAME          # log + register RUN_DIR's model, move champion/challenger
    sdpo version --pipeline NAME [--pull]  # dvc commit + push its stages (or pull them in a clone)
    sdpo export-metrics --pipeline NAME    # RUN_DIR/train_metrics.csv for `dvc plots`
    sdpo stack up|down|status              # local Prefect server + MLflow server + deployments
    sdpo deploy [--work-pool NAME]         # the same deployments on a (remote) work pool

Imports of prefect / mlflow / dvc happen inside the commands, so `sdpo` starts fast without them.
"""

from __future__ import annotations

import argparse
import json
import sys


def _cfg_and_run_dir(args: argparse.Namespace):
    from sdpo_core.cli import _load_cfg, _run_dir  # the core commands' own resolution

    cfg = _load_cfg(args)
    return cfg, _run_dir(args, cfg)


def cmd_register(args: argparse.Namespace) -> int:
    from flows.versioning import provenance_tags
    from sdpo_core.tracking_registry import register_model

    cfg, run_dir = _cfg_and_run_dir(args)
    reg = register_model(cfg, run_dir, parent_run_id=args.parent_run_id, tags=provenance_tags(cfg.pipeline))
    print(f"{reg.name} version {reg.version} -> {reg.alias}: {reg.reason}")
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    from flows import versioning
    from flows.settings import load_settings

    settings = load_settings()
    try:
        if args.pull:
            print(f"pulled: {' '.join(versioning.pull(args.pipeline, settings))}")
            return 0
        targets = versioning.commit_and_push(args.pipeline, args.stages.split(","), settings)
    except versioning.VersioningError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"versioned": targets, **versioning.provenance_tags(args.pipeline)}, indent=2))
    return 0


def cmd_export_metrics(args: argparse.Namespace) -> int:
    from sdpo_core.pipeline import export_train_metrics

    _, run_dir = _cfg_and_run_dir(args)
    print(export_train_metrics(run_dir))
    return 0


def cmd_stack(args: argparse.Namespace) -> int:
    from flows import stack

    return {"up": stack.up, "down": stack.down, "status": stack.status}[args.action]()


def cmd_deploy(args: argparse.Namespace) -> int:
    from flows.serve import deploy_to_pool
    from flows.settings import load_settings

    for name in deploy_to_pool(load_settings(), args.work_pool):
        print(f"deployment {name}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    from sdpo_core.cli import _add_common as _common  # --pipeline, --set, --pipelines, --run-dir

    p = sub.add_parser(
        "register", help="register RUN_DIR's model in MLflow; champion only if it beats the current one"
    )
    _common(p)
    p.add_argument("--parent-run-id", help="MLflow run to nest the registration run under")
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("version", help="dvc commit + push a pipeline's outputs (or --pull them)")
    p.add_argument("--pipeline", required=True)
    p.add_argument(
        "--stages", default="prepare,base,train,evaluate", help="stages to commit (default: %(default)s)"
    )
    p.add_argument("--pull", action="store_true", help="pull the pipeline's outputs from the remote instead")
    p.set_defaults(func=cmd_version)

    p = sub.add_parser("export-metrics", help="RUN_DIR/train_metrics.jsonl -> train_metrics.csv (dvc plots)")
    _common(p)
    p.set_defaults(func=cmd_export_metrics)

    p = sub.add_parser("stack", help="local Prefect server, MLflow server and the `sdpo` deployments")
    p.add_argument("action", choices=["up", "down", "status"])
    p.set_defaults(func=cmd_stack)

    p = sub.add_parser("deploy", help="create the deployments on a work pool (remote server, GPU workers)")
    p.add_argument("--work-pool", help="work pool name (default: prefect.work_pool in orchestration.yaml)")
    p.set_defaults(func=cmd_deploy)
