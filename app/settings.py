"""Service settings: one pydantic-settings object read from ``SCRATCHGPT_*`` variables and ``.env``.

Following the FastAPI full-stack template, every knob lives here and is passed to
``create_app(settings)``; nothing else in ``app/`` reads the environment.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# The source tree keeps templates/, static/ and migrations/ beside app/; an installed wheel
# carries them inside the app package (pyproject.toml maps them there).
REPO_ROOT = Path(__file__).resolve().parent.parent


def asset_dir(name: str) -> Path:
    """``templates``, ``static`` or ``migrations``: the installed package's copy, else the source tree's."""
    packaged = Path(__file__).resolve().parent / name
    return packaged if packaged.is_dir() else REPO_ROOT / name


def scratchgpt_home() -> Path:
    """Where scratchgpt keeps models, checkpoints and data: ``$SCRATCHGPT_HOME`` or ``~/.cache/scratchgpt``."""
    return Path(os.environ.get("SCRATCHGPT_HOME") or Path.home() / ".cache" / "scratchgpt").expanduser()


# The default chat models, in the order a new conversation prefers them (under <home>/models).
DEFAULT_CHAT_MODELS = ("smollm2-135m-chat", "smollm2-135m-instruct")
CHAT_MODEL_NAME = re.compile(r"[A-Za-z0-9._:/-]{1,200}")


def split_chat_model(item: str) -> tuple[str | None, Path]:
    """One SCRATCHGPT_CHAT_MODELS item: "name=folder" or "folder" (a folder whose name holds "=" needs a name)."""
    name, sep, path = item.partition("=")
    if not sep:
        name, path = "", item
    return (name.strip() or None), Path(path.strip()).expanduser()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SCRATCHGPT_", env_file=".env", extra="ignore", populate_by_name=True)

    # --- models -----------------------------------------------------------
    home: Path = Field(default_factory=scratchgpt_home)  # SCRATCHGPT_HOME, shared with the CLI's cache
    # One chat model (the setting before several could be served); SCRATCHGPT_CHAT_MODELS wins over it.
    chat_checkpoint: Path | None = None
    # The chat models served side by side: comma-separated checkpoint folders, each "path" or
    # "name=path" (the name is what /v1's `model` and a conversation's model say; by default the
    # checkpoint's own name). Unset (and no SCRATCHGPT_CHAT_CHECKPOINT): <home>/models/smollm2-135m-chat
    # (our instruction-tuned SmolLM2, made by `scratchgpt finetune instruct`) then
    # <home>/models/smollm2-135m-instruct (the released one). A new conversation gets the first that is ready.
    chat_models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # None means <home>/models/spam-classifier.
    classifier_checkpoint: Path | None = None
    chat_enabled: bool = True
    classifier_enabled: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # One model's dtype when it should differ from SCRATCHGPT_DTYPE (None: that setting). On a
    # CPU with AMX, bfloat16 runs the classifier's micro-batches much faster than float32 but
    # can move a probability by a few hundredths (docs/performance.md, "Service").
    chat_dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None
    classifier_dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None
    # CPU threads for torch; None lets torch decide. On a busy or small machine 1-2 avoids
    # OpenMP threads fighting each other (the chat and classifier workers run side by side).
    torch_threads: int | None = Field(None, ge=1)
    # The chat model decodes through our CPU kernels (core.fast.transforms.fast_for_serving; AVX-512, a C++
    # compiler, each kernel compiled once on first use). A checkpoint converted from a
    # GGUF file keeps the file's quantized blocks and, in fp32, decodes from them
    # (core.fast.gguf_matvec: the same weights, a fifth of the bytes) with its RMSNorms and rotary
    # embeddings one kernel call each (core.fast.fused_ops); any other fp32 or bf16 chat model reads
    # its weights as panels (core.fast.panels). On a CUDA GPU the decoding steps replay CUDA
    # graphs instead (core.fast.cuda_graphs). SCRATCHGPT_GGUF_KERNELS, its name before it
    # covered dense models too, is still read.
    fast_kernels: bool = Field(True, validation_alias=AliasChoices(
        "fast_kernels", "SCRATCHGPT_FAST_KERNELS", "gguf_kernels", "SCRATCHGPT_GGUF_KERNELS"))
    # Recent chats' KV caches kept for their next turn (core.fast.prefix_cache), in MiB; 0 keeps none.
    # A turn then prefills only the new message instead of the whole conversation.
    chat_prefix_cache_mb: int = Field(256, ge=0)
    # The chat engine (core.serving) decodes many answers together, each step. Answers decoded
    # together at most (each holds KV pages only for the tokens it has, so many fit: see
    # chat_kv_cache_mb); 1 decodes one at a time (the service before continuous batching).
    chat_max_batch: int = Field(32, ge=1)
    # Answers waiting for a place, over all users; past it a new one is refused (503, Retry-After).
    chat_max_waiting: int = Field(64, ge=0)
    # Per user (an API key or a browser session): answers decoding at once, and answers waiting (past
    # it, 429 with Retry-After). Clients of an open server without a session share no such limit.
    chat_max_running_per_owner: int = Field(4, ge=1)
    chat_max_waiting_per_owner: int = Field(8, ge=0)
    # Prompt tokens prefilled per step over all new answers: a long prompt is spread over several
    # steps, so the answers already streaming keep getting tokens; 32 chats arriving together all
    # start in one step.
    chat_prefill_chunk: int = Field(512, ge=1)
    # The engine's keys and values, all answers together, in MiB: one pool cut into pages of 16
    # positions, taken as answers grow (SmolLM2-135M fp32: 45 KiB a position, so 512 MiB hold 32
    # chats of 360 tokens); an answer that finds no free page waits. 0: the engine's default (512,
    # raised to hold one whole context window).
    chat_kv_cache_mb: int = Field(512, ge=0)

    # --- an external inference engine (app.services.remote_chat) ----------------
    # An OpenAI-compatible server (vLLM, llama.cpp's server, TGI, SGLang, another scratchgpt) that
    # generates the chat's answers instead of a model in this process: conversations, the UI, the
    # API, the limits above and storage stay here. Its root (http://host:8000 or .../v1), its API key,
    # the model's name there (None: the first its /v1/models lists) and its context window in tokens
    # (None: vLLM's max_model_len from that list, else 4096). SCRATCHGPT_CHAT_MAX_BATCH is then how
    # many answers stream from it at once. The timeout: seconds without a byte from it before an answer fails.
    chat_backend_url: str | None = None
    chat_backend_key: SecretStr | None = None
    chat_backend_model: str | None = None
    chat_backend_context_length: int | None = Field(None, ge=16)
    chat_backend_timeout: float = Field(300.0, gt=0)

    @field_validator("chat_backend_url")
    @classmethod
    def _check_backend_url(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            return None
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("SCRATCHGPT_CHAT_BACKEND_URL must be an http:// or https:// URL, like http://vllm:8000/v1")
        return value

    # --- storage ----------------------------------------------------------
    # None means sqlite:///<home>/scratchgpt.db.
    database_url: str | None = None

    # --- limits -----------------------------------------------------------
    max_request_bytes: int = Field(1_000_000, ge=1024)
    max_classify_chars: int = Field(20_000, ge=1)
    max_classify_batch: int = Field(64, ge=1)
    max_message_chars: int = Field(32_000, ge=1)
    max_new_tokens_cap: int = Field(2048, ge=1)
    max_title_chars: int = Field(200, ge=1)
    # Dynamic micro-batching for the classifier: a batch closes at this many
    # texts or after this many milliseconds, whichever comes first.
    classifier_batch_size: int = Field(16, ge=1)
    classifier_batch_wait_ms: float = Field(5.0, ge=0)
    # A micro-batch's texts are packed back to back into rows of at most this many tokens
    # (core.classifier.pack_texts), so no padding is computed; 0 pads each text to the longest.
    classifier_pack_tokens: int = Field(512, ge=0)
    # A micro-batch holds at most this many tokens, taken from every waiting owner in turn: a
    # one-text request waits behind at most the micro-batch that is running, not a whole large batch.
    classifier_batch_tokens: int = Field(4096, ge=1)
    # How often a streaming answer is written to the database.
    stream_flush_seconds: float = Field(0.5, gt=0)

    # --- replicas (app.services.cancellation; docs/architecture.md "Scaling out") ----------------
    # Other processes (web replicas, uvicorn workers) serve from this database too: a start then takes
    # only answers whose lease lapsed for a dead process's leftovers, not every answer still "streaming".
    shared_database: bool = False
    # How often each process looks in the database for stops and deletes another process received.
    stop_poll_seconds: float = Field(0.25, gt=0, le=5)
    # A streaming answer renewed by no process for this long is a dead process's: it becomes "interrupted".
    stream_lease_seconds: float = Field(15.0, ge=1)

    # --- generation defaults for new conversations -------------------------
    default_temperature: float = Field(0.7, ge=0, le=2)
    default_top_k: int | None = Field(50, ge=1)
    default_top_p: float | None = Field(0.95, gt=0, le=1)
    default_max_new_tokens: int = Field(256, ge=1)
    default_system_prompt: str = "You are a helpful assistant."

    # --- security ---------------------------------------------------------
    # API keys as {"user": "key"}; env: JSON, or "user:key,user2:key2".
    api_keys: Annotated[dict[str, SecretStr], NoDecode] = Field(default_factory=dict)
    # /metrics and the details of /ready (model paths, errors) for anyone, or only for API keys.
    # Unset: public without API keys (a single-user install), keys-only with them.
    public_service_details: bool | None = None

    @property
    def details_public(self) -> bool:
        return not self.api_keys if self.public_service_details is None else self.public_service_details
    # Signs session cookies and CSRF tokens. None means a random key kept in <home>/secret_key.
    secret_key: SecretStr | None = None
    secret_key_file: Path | None = None  # None means <home>/secret_key
    ui_enabled: bool = True
    cookie_secure: bool = False
    session_cookie: str = "scratchgpt_session"

    # --- operations -------------------------------------------------------
    log_level: str = "INFO"
    log_json: bool = True
    templates_dir: Path = asset_dir("templates")
    static_dir: Path = asset_dir("static")
    migrations_dir: Path = asset_dir("migrations")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _parse_api_keys(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        text = value.strip()
        if not text:
            return {}
        if text.startswith("{"):
            return json.loads(text)
        keys: dict[str, str] = {}
        for item in text.split(","):
            user, sep, key = item.strip().partition(":")
            if not sep or not user or not key:
                raise ValueError(
                    "SCRATCHGPT_API_KEYS must be JSON like {\"alice\": \"KEY\"} or 'alice:KEY,bob:KEY2'"
                )
            keys[user] = key
        return keys

    @field_validator("api_keys")
    @classmethod
    def _check_api_keys(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for user, key in value.items():
            if len(key.get_secret_value()) < 16:
                raise ValueError(f"API key for user {user!r} is shorter than 16 characters; use a long random key")
        return value

    @field_validator("chat_models", mode="before")
    @classmethod
    def _parse_chat_models(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [item for item in value.split(",") if item.strip()]
        if isinstance(value, (list, tuple)):
            return [str(item).strip() for item in value]
        return value

    @field_validator("chat_models")
    @classmethod
    def _check_chat_models(cls, value: list[str]) -> list[str]:
        names: set[str] = set()
        for item in value:
            name, path = split_chat_model(item)
            if not item.rpartition("=")[2].strip() or (name is not None and not CHAT_MODEL_NAME.fullmatch(name)):
                raise ValueError(
                    f"SCRATCHGPT_CHAT_MODELS item {item!r}: give a checkpoint folder, or name=folder with a name of "
                    "letters, digits and . _ - : / (at most 200)"
                )
            shown = name or path.name
            if shown in names:
                raise ValueError(f"SCRATCHGPT_CHAT_MODELS names {shown!r} twice; give one of them a name (name=folder)")
            names.add(shown)
        return value

    @model_validator(mode="after")
    def _fill_defaults(self) -> "Settings":
        # Defaults that depend on home are filled here so that every reader sees concrete values
        # (the CLI's `scratchgpt download` / `finetune spam` write to these same places).
        if self.classifier_checkpoint is None:
            self.classifier_checkpoint = self.home / "models" / "spam-classifier"
        if self.secret_key_file is None:
            self.secret_key_file = self.home / "secret_key"
        if self.database_url is None:
            self.database_url = f"sqlite:///{self.home / 'scratchgpt.db'}"
        if self.chat_checkpoint is not None:
            self.chat_checkpoint = Path(self.chat_checkpoint).expanduser()
        self.classifier_checkpoint = Path(self.classifier_checkpoint).expanduser()
        return self

    def dtype_for(self, role: str) -> str:
        """The dtype setting for the ``chat`` or ``classifier`` model: its own, else SCRATCHGPT_DTYPE."""
        own = {"chat": self.chat_dtype, "classifier": self.classifier_dtype}[role]
        return own or self.dtype

    def chat_model_entries(self) -> list[tuple[str | None, Path]]:
        """(name or None for the checkpoint's own, folder) of each chat model to serve, in order."""
        if self.chat_models:
            return [split_chat_model(item) for item in self.chat_models]
        if self.chat_checkpoint is not None:
            return [(None, self.chat_checkpoint)]
        return [(None, self.home / "models" / name) for name in DEFAULT_CHAT_MODELS]

    @property
    def resolved_chat_checkpoint(self) -> Path:
        """The first chat model's folder."""
        return self.chat_model_entries()[0][1]

    @property
    def resolved_classifier_checkpoint(self) -> Path:
        assert self.classifier_checkpoint is not None
        return self.classifier_checkpoint

    @property
    def resolved_database_url(self) -> str:
        assert self.database_url is not None
        return self.database_url
