"""Prefect orchestration of sdpo: the `sdpo` flow, its deployments, the local stack.

Nothing here implements a stage: tasks call ``sdpo_core``'s stage functions, as the CLI does.
"""

import os

# sdpo_core logs through stdlib logging; Prefect attaches its run-log handlers to these loggers at
# import time, so this must be set before prefect is first imported.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "sdpo_core")
