"""Property-based fuzzing of the HTTP API from its own OpenAPI document (schemathesis, in-process ASGI).

Every operation in /openapi.json is called with generated valid and invalid requests (the
examples, coverage and fuzzing phases of schemathesis' pytest integration), and its default
checks all stay on: no 5xx, every status code and content type documented, responses and SSE
events matching their schemas, invalid requests rejected and valid ones accepted. On top of
those, every rejection must be a 4xx whose JSON body says what was wrong.

Two passes: one with random path ids (mostly 404s, which must be documented too), and one
aimed at a real conversation and a real answer in it (edits at its question), so the message,
edit, regenerate, continue, select, follow, update and Lab routes are reached with fuzzed bodies. Tiny models and a max_new_tokens cap of 4 keep each
streamed answer short.

schemathesis needs the schema when pytest collects the tests, and the schema states limits of
the loaded chat model (its layers, heads and vocabulary), so the app is started at import: tiny
checkpoints in a temporary folder, the lifespan entered once and left by the module fixture.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, settings
from starlette.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from app_testing import parse_sse

# About 1,200 requests; 30-60 s on two busy cores.
pytestmark = pytest.mark.slow

TINY = dict(vocab_size=50257, emb_dim=32, n_layers=2, n_heads=2)


def _tiny_checkpoints(folder: Path) -> tuple[Path, Path]:
    """A chat model and a spam classifier, random weights, saved as the training jobs save theirs."""
    from core.generation.chat_template import ALPACA
    from core.weights.checkpoint import save_checkpoint
    from core.classifier import SequenceClassifier
    from core.model.config import ModelConfig
    from core.model import GPTModel
    from core.tokenizer.gpt2 import gpt2_tokenizer

    torch.manual_seed(0)
    tokenizer = gpt2_tokenizer()
    chat = save_checkpoint(folder / "chat", GPTModel(ModelConfig(context_length=256, **TINY)), tokenizer,
                           chat_template=ALPACA, metadata={"name": "fuzz-chat"})
    spam = save_checkpoint(folder / "spam", SequenceClassifier(GPTModel(ModelConfig(context_length=64, **TINY)), 2),
                           tokenizer, task="classification", labels=["ham", "spam"], metadata={"name": "fuzz-spam"})
    return chat, spam


WORKDIR = Path(tempfile.mkdtemp(prefix="scratchgpt-fuzz-"))
_RUNNING = contextlib.ExitStack()
_RUNNING.callback(shutil.rmtree, WORKDIR, ignore_errors=True)
atexit.register(_RUNNING.close)  # when the module is collected but its tests are deselected
_chat, _spam = _tiny_checkpoints(WORKDIR)
APP = create_app(
    Settings(
        home=WORKDIR / "home",
        chat_checkpoint=_chat,
        classifier_checkpoint=_spam,
        database_url=f"sqlite:///{WORKDIR / 'app.db'}",
        secret_key="fuzz-secret-key-0123456789abcdef0123456789",
        device="cpu",
        log_json=False,
        log_level="WARNING",
        max_new_tokens_cap=4,
        default_max_new_tokens=4,
        stream_flush_seconds=0.05,
    )
)
CLIENT = _RUNNING.enter_context(TestClient(APP))  # runs the lifespan: migrations, model loading
assert APP.state.models.wait_loaded(60), "models did not finish loading"
assert {r: s.state for r, s in APP.state.models.slots.items()} == {"chat": "ready", "classifier": "ready"}, (
    APP.state.models.status()
)


async def app_without_lifespan(scope, receive, send) -> None:
    """APP for HTTP; lifespan events are only acknowledged (APP's own lifespan is already running)."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    await APP(scope, receive, send)


schema = schemathesis.openapi.from_asgi("/openapi.json", app_without_lifespan)

FUZZ_SETTINGS = settings(
    max_examples=10,
    deadline=None,
    derandomize=True,  # the same cases on every run: a failure here is reproducible
    suppress_health_check=list(HealthCheck),
    database=None,
)

# The conversation and answer the second pass aims at (replaced when a fuzzed DELETE removes it).
TARGET: dict[str, object] = {}


def make_target() -> None:
    created = CLIENT.post("/api/v1/conversations", json={"title": "fuzzed", "temperature": 0.0})
    assert created.status_code == 201, created.text
    cid = created.json()["id"]
    with CLIENT.stream("POST", f"/api/v1/conversations/{cid}/messages", json={"content": "hello"}) as response:
        events = list(parse_sse(response.iter_lines()))
    assert events[-1][0] == "done", events
    TARGET.update(conversation_id=cid, message_id=events[-1][1]["message"]["id"],
                  question_id=events[0][1]["user_message"]["id"])


@pytest.fixture(scope="module", autouse=True)
def served(one_torch_thread):
    try:
        make_target()
        yield
    finally:
        _RUNNING.close()


def test_schema_states_the_loaded_models_limits():
    components = schema.raw_schema["components"]["schemas"]
    assert components["AttentionRequest"]["properties"]["head"]["anyOf"][0]["maximum"] == TINY["n_heads"] - 1
    assert components["NextTokenRequest"]["properties"]["token_ids"]["items"]["maximum"] == TINY["vocab_size"] - 1
    assert components["MessageCreate"]["properties"]["content"]["maxLength"] == APP.state.settings.max_message_chars


def assert_rejection_explained(response) -> None:
    """No 5xx; a 4xx carries a JSON body that names the problem (REST: detail; /v1: OpenAI's error.message)."""
    status = response.status_code
    assert status < 500, f"server error {status}: {response.text[:500]}"
    if status < 400:
        return
    body = json.loads(response.content)
    message = body.get("detail") if "detail" in body else body.get("error", {}).get("message")
    assert message, f"{status} without a message: {response.text[:300]}"


@schema.parametrize()
@FUZZ_SETTINGS
def test_api_conforms_to_its_schema(case):
    response = case.call_and_validate()
    assert_rejection_explained(response)


@schema.include(path_regex=r"\{conversation_id\}").parametrize()
@FUZZ_SETTINGS
def test_conversation_routes_with_a_real_conversation(case):
    params = dict(case.path_parameters or {})
    params["conversation_id"] = TARGET["conversation_id"]
    edit = case.path.endswith("/edit")
    if "message_id" in params:  # an edit is of a question; the other message routes are about an answer
        params["message_id"] = TARGET["question_id" if edit else "message_id"]
    case.path_parameters = params
    response = case.call_and_validate()
    assert_rejection_explained(response)
    if (case.method.upper() == "DELETE" and response.status_code == 204) or (edit and response.status_code == 200):
        make_target()  # gone (deleted, or replaced by the edit): aim the cases still to come at a new one
