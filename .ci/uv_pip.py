"""Run `uv pip ARGS...` with this machine's pip configuration, so uv installs what pip would.

    python .ci/uv_pip.py UV install --python .venv/bin/python -c constraints.txt ...

uv does not read pip.conf or PIP_* variables. This reads them through `pip config list` (the
files and the environment, in pip's own precedence) and passes on what decides which files are
installed: the index URLs, find-links folders (here the CPU build of torch lies in one), global
constraint files, the CA bundle and the timeout. As pip does, every index is searched for the
best match (`--index-strategy unsafe-best-match`), not only the first that has the package.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

LIST_KEYS = {  # pip option -> uv option; pip lists them whitespace-separated
    "index-url": "--index-url",
    "extra-index-url": "--extra-index-url",
    "find-links": "--find-links",
    "constraint": "--constraint",
}


def pip_config() -> dict[str, str]:
    """Option -> value, the environment overriding the files (``:env:`` last in pip's list)."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True
    ).stdout
    found: dict[str, tuple[int, str]] = {}
    for line in out.splitlines():
        m = re.fullmatch(r"(:env:|global|install)\.([\w-]+)='(.*)'", line.strip())
        if m:  # install.* beats global.*, the environment beats both
            rank = {"global": 0, "install": 1, ":env:": 2}[m[1]]
            if m[2] not in found or rank >= found[m[2]][0]:
                found[m[2]] = (rank, m[3])
    return {key: value for key, (_, value) in found.items()}


def uv_args_env(config: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    args, env = ["--index-strategy", "unsafe-best-match"], {}
    for key, flag in LIST_KEYS.items():
        for value in shlex.split(config.get(key) or ""):
            args += [flag, value]
    if config.get("cert"):
        env["SSL_CERT_FILE"] = config["cert"]
    if config.get("timeout") or config.get("default-timeout"):
        env["UV_HTTP_TIMEOUT"] = config.get("timeout") or config["default-timeout"]
    return args, env


def main() -> None:
    uv, command, *rest = sys.argv[1:]
    args, env = uv_args_env(pip_config())
    os.execve(uv, [uv, "pip", command, *args, *rest], {**os.environ, **env})


if __name__ == "__main__":
    main()
