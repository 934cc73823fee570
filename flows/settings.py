"""Orchestration settings: where Prefect, MLflow, DVC and S3 live, and the retraining schedule.

Read from ``orchestration.yaml`` (or the file named by ``SDPO_ORCHESTRATION_FILE``), then
overridden by environment variables ``SDPO_<SECTION>__<KEY>``, e.g.::

    SDPO_S3__BUCKET=models SDPO_S3__ENDPOINT_URL=http://127.0.0.1:9000 sdpo stack up
    SDPO_SCHEDULE__CRON="0 2 * * *" sdpo stack up

Credentials are never settings: S3 keys come from the environment (``AWS_ACCESS_KEY_ID`` ...) or
an AWS profile, as boto3 finds them. Unknown keys are rejected.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)
from pydantic_settings import (
    SettingsError as PydanticSettingsError,
)

from sdpo_core.config import ConfigError, one_line, read_yaml

DEFAULT_FILE = "orchestration.yaml"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PrefectSettings(_Section):
    api_url: str | None = Field(
        default=None, description="a running (remote) Prefect API; `stack up` then starts no server"
    )
    host: str = "127.0.0.1"
    port: int = Field(default=4200, ge=1, le=65535)
    work_pool: str | None = Field(
        default=None, description="work pool `sdpo deploy` targets (e.g. a GPU pool)"
    )
    source: str | None = Field(
        default=None,
        description="git URL workers clone the project from (`sdpo deploy`); default: this checkout",
    )
    poll_seconds: float = Field(default=5.0, gt=0, description="how often `serve` polls for scheduled runs")
    network_retries: int = Field(default=2, ge=0, description="retries of the register and version tasks")


class MlflowSettings(_Section):
    tracking_uri: str | None = Field(
        default=None, description="a running MLflow (remote server or sqlite URI); overrides the stack's own"
    )
    server: bool = Field(default=True, description="`stack up` starts an `mlflow server` (UI + tracking)")
    host: str = "127.0.0.1"
    port: int = Field(default=5000, ge=1, le=65535)
    workers: int = Field(default=1, ge=1, description="server worker processes (mlflow's own default is 4)")
    backend_store_uri: str = Field(default="sqlite:///mlflow.db", description="the CLI's default store too")
    artifacts_destination: str | None = Field(
        default=None,
        description="local folder or s3://... ; default: s3://BUCKET/PREFIX/mlflow with an S3 "
        "bucket, else STATE_DIR/mlartifacts",
    )
    serve_artifacts: bool = Field(
        default=True, description="the server proxies artifacts; false: clients write the store directly"
    )


class S3Settings(_Section):
    endpoint_url: str | None = Field(default=None, description="any S3-compatible endpoint; None: AWS")
    bucket: str | None = None
    prefix: str = "sdpo"
    region: str | None = None

    @field_validator("prefix")
    @classmethod
    def _strip(cls, v: str) -> str:
        return v.strip("/")


class DvcSettings(_Section):
    enabled: bool = Field(default=True, description="the flow's version task runs `dvc commit` + `dvc push`")
    remote: str | None = Field(
        default=None,
        description="remote to push to; default: 's3' when s3.bucket is set, else the repo's default",
    )
    push: bool = True
    git_commit: bool = Field(default=False, description="also `git commit dvc.lock` after a versioned run")


class LaunchSettings(_Section):
    accelerate_config: str | None = Field(
        default=None,
        description="`accelerate launch --config_file` for training with more than one process (e.g. an FSDP "
        "config of configs/accelerate/); null: plain data-parallel processes (--multi_gpu)",
    )
    stop_seconds: float = Field(
        default=20.0, gt=0, le=28,
        description="on cancel, how long the training processes get after SIGTERM before SIGKILL (Prefect's "
        "worker kills the whole flow run 30 s after its own SIGTERM)",
    )


class ScheduleSettings(_Section):
    deployment: str = "retrain"
    cron: str = "0 3 * * 1"
    timezone: str = "UTC"
    active: bool = True
    pipeline: str = "digits-tiny"
    overrides: list[str] = Field(default_factory=list)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SDPO_", env_nested_delimiter="__", extra="forbid")

    state_dir: Path = Field(default=Path(".sdpo-stack"), description="PIDs, logs, Prefect's database")
    pipelines_file: Path = Path("pipelines.yaml")
    runs_root: Path | None = Field(
        default=None,
        description="absolute folder that holds the flow's run directories (<runs_root>/<pipeline>), outside "
        "the checkout: kept across flow runs and shared by the machines of a run; null: the checkout's runs/",
    )
    launch: LaunchSettings = Field(default_factory=LaunchSettings)
    prefect: PrefectSettings = Field(default_factory=PrefectSettings)
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings)
    s3: S3Settings = Field(default_factory=S3Settings)
    dvc: DvcSettings = Field(default_factory=DvcSettings)
    schedule: ScheduleSettings = Field(default_factory=ScheduleSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, YamlConfigSettingsSource(settings_cls, yaml_file=settings_file())

    @field_validator("runs_root")
    @classmethod
    def _absolute(cls, v: Path | None) -> Path | None:
        if v is None:
            return None
        v = v.expanduser()
        if not v.is_absolute():
            # a relative folder would follow each flow run's working directory (a temporary clone)
            raise ValueError("must be an absolute path (a folder outside the checkout) or null")
        return v

    # ------------------------------------------------------------------ derived values
    @property
    def dvc_remote(self) -> str | None:
        if self.dvc.remote is None and self.s3.bucket:
            return "s3"
        return self.dvc.remote

    def s3_url(self, *parts: str) -> str:
        if not self.s3.bucket:
            raise ValueError("s3.bucket is not set")
        return "s3://" + "/".join(p for p in (self.s3.bucket, self.s3.prefix, *parts) if p)

    def artifacts_destination(self) -> str:
        if self.mlflow.artifacts_destination:
            return self.mlflow.artifacts_destination
        if self.s3.bucket:
            return self.s3_url("mlflow")
        return str((self.state_dir / "mlartifacts").resolve())

    def stack_tracking_uri(self) -> str | None:
        """The tracking URI flows use: an explicit one, the stack's own server, or None (sqlite default)."""
        if self.mlflow.tracking_uri:
            return self.mlflow.tracking_uri
        if self.mlflow.server:
            return f"http://{self.mlflow.host}:{self.mlflow.port}"
        return None


class SettingsError(ConfigError):
    """orchestration.yaml or an ``SDPO_*`` variable holds something Settings cannot take; the message
    names the file or the variable, the key and what was expected (the CLI: exit 2, one line)."""


def settings_file() -> str:
    return os.environ.get("SDPO_ORCHESTRATION_FILE", DEFAULT_FILE)


def load_settings() -> Settings:
    """The settings, or SettingsError naming where each bad value came from."""
    path = settings_file()
    if Path(path).is_file():  # read here first: pydantic-settings would raise YAML / decoding errors raw
        data = read_yaml(Path(path))
        if data is not None and not isinstance(data, dict):
            raise SettingsError(f"{path}: expected a mapping of sections (prefect, mlflow, s3, dvc, schedule, "
                                f"...), got a {type(data).__name__}")
    try:
        return Settings()
    except ValidationError as exc:
        raise SettingsError(_settings_problems(exc, path)) from None
    except PydanticSettingsError as exc:  # an SDPO_* list or mapping that is not JSON
        raise SettingsError(f"invalid orchestration settings: {one_line(exc)}: a list or mapping in an SDPO_* "
                            "variable is JSON, e.g. SDPO_SCHEDULE__OVERRIDES='[\"train.epochs=1\"]'") from None


def _settings_problems(err: ValidationError, path: str) -> str:
    problems = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        var = "SDPO_" + "__".join(str(p) for p in e["loc"]).upper()
        where = f"environment variable {var}" if var in os.environ else path
        if e["type"] == "extra_forbidden":
            problems.append(f"{where}: unknown key {key!r}")
        else:
            problems.append(f"{where}: {key!r}: {e['msg']} (got {e.get('input')!r})")
    return "invalid orchestration settings: " + "; ".join(problems)
