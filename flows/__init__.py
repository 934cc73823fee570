"""Prefect orchestration of sdpo: the `sdpo` flow, its deployments, the local stack.

Nothing here implements a stage: tasks call ``sdpo_core``'s stage functions, as the CLI does.
"""

import os

# sdpo_core logs through stdlib logging; Prefect attaches its run-log handlers to these loggers at
# import time, so this must be set before prefect is first imported. The same loggers also log
# outside flow runs (the stages called directly, a worker between runs): there the records go to
# the console only, without Prefect's per-record "no flow run id" warning. The stack passes the
# same settings to the serve process and prints them for a shell (flows/stack.py).
LOG_ENV = {"PREFECT_LOGGING_EXTRA_LOGGERS": "sdpo_core", "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore"}
for _key, _value in LOG_ENV.items():
    os.environ.setdefault(_key, _value)
