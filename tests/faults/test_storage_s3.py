"""`dvc push` to an S3 remote (moto's server on 127.0.0.1) whose endpoint goes down: the version
step retries, then fails naming the endpoint; once it is back, a rerun pushes what is missing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fault_servers import TcpForwarder
from orchestration_testing import BIN, OFFLINE_ENV, free_port, make_project, start, stop, wait_http

pytestmark = pytest.mark.services
BUCKET = "sdpo-faults"
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def moto(tmp_path):
    port = free_port()
    proc = start([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], tmp_path / "moto.log",
                 {**os.environ, **AWS})
    try:
        wait_http(f"http://127.0.0.1:{port}", 30, proc)
        yield port
    finally:
        stop(proc)


def _s3_keys(endpoint: str) -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    return [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])]


def test_dvc_push_to_a_down_endpoint_retries_names_it_and_a_rerun_pushes(moto, tmp_path, monkeypatch):
    """Fault: the S3 endpoint refuses connections during `dvc push`. Must hold: the push is tried
    1 + prefect.network_retries times, then fails with a VersioningError naming the remote URL and
    the endpoint; nothing half-pushed blocks a rerun: with the endpoint back, the same call pushes
    every file of the committed outputs (the remote then holds the DVC cache's files)."""
    import boto3

    from flows import versioning
    from flows.settings import load_settings
    from sdpo_core.config import load_config
    from sdpo_core.stages import prepare_stage

    project = make_project(tmp_path / "project")
    endpoint = TcpForwarder(moto)
    endpoint.start()
    boto3.client("s3", endpoint_url=endpoint.url, **{k.lower(): v for k, v in AWS.items()
                                                     if k != "AWS_DEFAULT_REGION"},
                 region_name="us-east-1").create_bucket(Bucket=BUCKET)
    monkeypatch.chdir(project)
    for key, value in {**OFFLINE_ENV, **AWS, "SDPO_S3__BUCKET": BUCKET, "SDPO_S3__ENDPOINT_URL": endpoint.url,
                       "SDPO_PREFECT__NETWORK_RETRIES": "1",
                       "DVC_SITE_CACHE_DIR": str(project / ".dvc/tmp/site-cache")}.items():
        monkeypatch.setenv(key, value)
    prepare_stage(load_config("tiny-random", [], Path("pipelines.yaml")), Path("runs/tiny-random"))
    settings = load_settings()

    endpoint.stop()
    try:
        with pytest.raises(versioning.VersioningError) as exc:
            versioning.commit_and_push("tiny-random", ["prepare"], settings)
    finally:
        endpoint.start()
    message = str(exc.value)
    assert f"s3://{BUCKET}/sdpo/dvc at endpoint {endpoint.url}" in message and "after 2 attempt(s)" in message
    assert _s3_keys(endpoint.url) == []

    assert versioning.commit_and_push("tiny-random", ["prepare"], settings) == ["prepare@tiny-random"]
    cache = project / ".dvc/cache"
    cached = {p.relative_to(cache).as_posix() for p in (cache / "files").rglob("*") if p.is_file()}
    pushed = {k.removeprefix("sdpo/dvc/") for k in _s3_keys(endpoint.url)}
    assert cached and cached == pushed
