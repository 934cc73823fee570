"""The Prefect/DVC subcommands of `sdpo`, added by ``sdpo_core.cli`` when ``flows`` is installed (it
looks this module up by name in ``COMMAND_PLUGINS``; nothing in ``sdpo_core`` imports ``flows``)::

    sdpo version --pipeline NAME [--pull]  # dvc commit + push its stages (or pull them in a clone)
    sdpo stack up|down|status              # local Prefect server + MLflow server + deployments
    sdpo deploy [--work-pool NAME]         # the same deployments on a (remote) work pool

The core stages (``sdpo register``, ``sdpo export-metrics`` among them) live in ``sdpo_core.cli``.
Imports of prefect / dvc happen inside the commands, so `sdpo` starts fast without them.
"""

from __future__ import annotations

import argparse
import json
import sys

from sdpo_core.stages import versioned_stages


def cmd_version(args: argparse.Namespace) -> int:
    from flows import versioning
    from flows.settings import load_settings
    from sdpo_core.tracking.provenance import provenance_tags

    settings = load_settings()
    try:
        if args.pull:
            print(f"pulled: {' '.join(versioning.pull(args.pipeline, settings))}")
            return 0
        targets = versioning.commit_and_push(args.pipeline, args.stages.split(","), settings)
    except versioning.VersioningError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"versioned": targets, **provenance_tags(args.pipeline)}, indent=2))
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
    """Add ``version``, ``stack`` and ``deploy`` to the `sdpo` subcommands ``sub``."""
    p = sub.add_parser("version", help="dvc commit + push a pipeline's outputs (or --pull them)")
    p.add_argument("--pipeline", required=True)
    p.add_argument(
        "--stages", default=",".join(versioned_stages()), help="stages to commit (default: %(default)s)"
    )
    p.add_argument("--pull", action="store_true", help="pull the pipeline's outputs from the remote instead")
    p.set_defaults(func=cmd_version)

    p = sub.add_parser("stack", help="local Prefect server, MLflow server and the `sdpo` deployments")
    p.add_argument("action", choices=["up", "down", "status"])
    p.set_defaults(func=cmd_stack)

    p = sub.add_parser("deploy", help="create the deployments on a work pool (remote server, GPU workers)")
    p.add_argument("--work-pool", help="work pool name (default: prefect.work_pool in orchestration.yaml)")
    p.set_defaults(func=cmd_deploy)
