"""Prompt sources where data pipelines keep them (issue 23): ``s3://`` against moto's S3 server on
127.0.0.1 (a versioned bucket), ``http://`` against a local HTTP server that sends an ETag, and
JSONL; the manifest records which version of the source was read; bad sources name themselves."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from orchestration_testing import versioned_bucket

from sdpo_core.config import PromptsConfig
from sdpo_core.prompts import PromptError, load_prompt_set, load_split, prepare

pytestmark = pytest.mark.services
BUCKET = "sdpo-prompts"


@pytest.fixture
def s3(tmp_path, monkeypatch):
    """A boto3 client of a fresh moto server with a versioned bucket; AWS_* point s3fs at it."""
    with versioned_bucket(BUCKET, tmp_path / "moto.log", monkeypatch) as client:
        yield client


def _jsonl(prompts: list[str]) -> bytes:
    return "".join(json.dumps({"prompt": p, "lang": "en", "batch": i}) + "\n" for i, p in enumerate(prompts)).encode()


def test_s3_jsonl_source_records_the_object_version_and_a_new_upload_is_a_new_version(s3, tmp_path):
    source = f"s3://{BUCKET}/incoming/prompts.jsonl"
    first = s3.put_object(Bucket=BUCKET, Key="incoming/prompts.jsonl", Body=_jsonl([f"a cat {i}" for i in range(10)]))
    split = prepare(PromptsConfig(source=source, eval_fraction=0.2), tmp_path / "one")
    version = split.manifest["source_version"]
    assert version["version_id"] == first["VersionId"] and version["etag"] == first["ETag"].strip('"')
    assert version["metadata_fields"] == ["batch", "lang"]
    assert sorted(split.train + split.eval) == sorted(f"a cat {i}" for i in range(10))  # the prompt field only
    assert load_split(tmp_path / "one").manifest["source_version"] == version

    second = s3.put_object(Bucket=BUCKET, Key="incoming/prompts.jsonl", Body=_jsonl([f"a dog {i}" for i in range(10)]))
    split2 = prepare(PromptsConfig(source=source, eval_fraction=0.2), tmp_path / "two")
    assert split2.manifest["source_version"]["version_id"] == second["VersionId"] != first["VersionId"]
    assert all(p.startswith("a dog") for p in split2.train + split2.eval)
    with pytest.raises(PromptError, match=f"cannot read 's3://{BUCKET}/missing.txt'"):
        load_prompt_set(f"s3://{BUCKET}/missing.txt")


class _Handler(BaseHTTPRequestHandler):
    files = {"/prompts.txt": (b"a red fox\na blue owl\n\na red fox\n", '"v7"')}

    def _send(self, body: bool) -> None:
        if self.path not in self.files:
            self.send_error(404)
            return
        data, etag = self.files[self.path]
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("ETag", etag)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_HEAD(self):  # noqa: N802
        self._send(False)

    def do_GET(self):  # noqa: N802
        self._send(True)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_text_source_records_its_etag_and_a_missing_file_is_named(http_url, tmp_path):
    pset = load_prompt_set(f"{http_url}/prompts.txt")
    assert pset.prompts == ["a red fox", "a blue owl"] and pset.raw_count == 4
    assert pset.version["etag"] == "v7" and len(pset.version["sha256"]) == 64
    with pytest.raises(PromptError, match=f"cannot read '{http_url}/gone.txt'"):
        load_prompt_set(f"{http_url}/gone.txt")


def test_local_jsonl_without_a_prompt_field_names_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a cat"}\n{"text": "a dog"}\n')
    with pytest.raises(PromptError, match=r"p.jsonl' line 2: expected an object with a string 'prompt'"):
        load_prompt_set(str(path))
    path.write_text('{"prompt": "a cat"}\n\n{"prompt": "a dog", "id": 3}\n')
    assert load_prompt_set(str(path)).prompts == ["a cat", "a dog"]
