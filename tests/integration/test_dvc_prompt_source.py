"""DVC-tracked prompt sources (issue 23): a file added with a real `dvc add` in a throwaway git
repository, and an output of a dvc.yaml stage after a real `dvc repro`, are read as usual and the
manifest records DVC's md5 of them; a tracked file missing from the workspace says to `dvc pull`;
an untracked file's manifest is unchanged (no source version)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import yaml
from orchestration_testing import GIT_IDENTITY, git

from sdpo_core.config import PromptsConfig
from sdpo_core.prompts import PromptError, load_prompt_set, prepare


def _dvc(repo, *argv: str) -> None:
    env = {**os.environ, **GIT_IDENTITY, "DVC_NO_ANALYTICS": "1",
           "DVC_SITE_CACHE_DIR": str(repo / ".dvc" / "tmp" / "site-cache")}
    out = subprocess.run([sys.executable, "-m", "dvc", *argv], cwd=repo, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, (argv, out.stdout[-2000:], out.stderr[-2000:])


@pytest.fixture
def repo(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    _dvc(repo, "init", "-q")
    monkeypatch.chdir(repo)
    return repo


def test_dvc_added_file_records_its_dvc_md5_and_a_missing_one_says_dvc_pull(repo, tmp_path):
    (repo / "prompts").mkdir()
    body = b"a red fox\na blue owl\na green frog\na grey cat\n"
    (repo / "prompts/new.txt").write_bytes(body)
    _dvc(repo, "add", "prompts/new.txt")
    recorded = yaml.safe_load((repo / "prompts/new.txt.dvc").read_text())["outs"][0]["md5"]
    assert recorded == hashlib.md5(body).hexdigest()

    split = prepare(PromptsConfig(source="prompts/new.txt", eval_fraction=0.5), tmp_path / "split")
    version = split.manifest["source_version"]
    assert version == {"dvc_md5": recorded, "dvc_file": str(repo / "prompts/new.txt.dvc"), "dvc_path": "new.txt"}
    assert json.loads((tmp_path / "split/manifest.json").read_text())["source_version"] == version
    assert sorted(split.train + split.eval) == sorted(body.decode().split("\n")[:-1])

    (repo / "prompts/new.txt").write_bytes(body + b"a late addition\n")  # edited after `dvc add`
    assert load_prompt_set(str(repo / "prompts/new.txt")).version["dvc_modified"] is True

    (repo / "prompts/new.txt").unlink()
    with pytest.raises(PromptError, match=r"'prompts/new.txt' is tracked by DVC .*new.txt.dvc.*run `dvc pull "
                                          r"prompts/new.txt` first"):
        load_prompt_set("prompts/new.txt")
    _dvc(repo, "checkout", "prompts/new.txt")  # what `dvc pull` does after fetching: back from the cache
    assert load_prompt_set("prompts/new.txt").version["dvc_md5"] == recorded


def test_stage_output_records_the_md5_in_dvc_lock_and_untracked_files_have_no_version(repo, tmp_path):
    (repo / "prompts").mkdir()
    write = "open('prompts/gen.jsonl', 'w').write(''.join('{\"prompt\": \"a dog %d\"}\\n' % i for i in range(6)))"
    (repo / "make.py").write_text(write + "\n")
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"make": {
        "cmd": f"{sys.executable} make.py", "deps": ["make.py"], "outs": ["prompts/gen.jsonl"]}}}))
    _dvc(repo, "repro", "-q")
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["make"]["outs"][0]
    assert lock["md5"] == hashlib.md5((repo / "prompts/gen.jsonl").read_bytes()).hexdigest()

    pset = load_prompt_set("prompts/gen.jsonl")
    assert pset.prompts == [f"a dog {i}" for i in range(6)]
    assert pset.version["dvc_md5"] == lock["md5"] and pset.version["dvc_file"] == str(repo / "dvc.lock")
    assert pset.version["sha256"] == hashlib.sha256((repo / "prompts/gen.jsonl").read_bytes()).hexdigest()

    (repo / "prompts/plain.txt").write_text("a cat\na bird\n")
    assert "source_version" not in prepare(PromptsConfig(source="prompts/plain.txt", eval_fraction=0.5),
                                           tmp_path / "plain").manifest
