"""The OpenAPI document, made to describe this server as configured.

The request models are static, but the limits are settings: the document is patched so its
``maxLength``/``maxItems``/``maximum`` are the configured ones, and the API-key security
schemes are listed only when keys are configured (without keys the API is open). The Lab's
indices (layer, head, token id) are bounded by the loaded chat model, so the document is kept
only once the models have settled.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from app.settings import Settings


def _property(schema: dict[str, Any], model: str, field: str) -> dict[str, Any] | None:
    """The (non-null branch of the) JSON schema of ``model.field``, or None if absent."""
    prop = schema.get("components", {}).get("schemas", {}).get(model, {}).get("properties", {}).get(field)
    if prop is None:
        return None
    for branch in prop.get("anyOf", []):
        if branch.get("type") != "null":
            return branch
    return prop


def _limit(schema: dict[str, Any], model: str, field: str, **limits: int) -> None:
    prop = _property(schema, model, field)
    if prop is not None:
        target = prop.get("items", prop) if "maxLength" in limits and prop.get("type") == "array" else prop
        target.update(limits)


def _model_limits(schema: dict[str, Any], app: FastAPI) -> None:
    """What the loaded chat model bounds: the Lab's layer and head indices, token ids and prompt length."""
    models = getattr(app.state, "models", None)
    chat = models.slots.get("chat") if models is not None else None
    if chat is None or chat.checkpoint is None or chat.checkpoint.model is None:  # none here: a remote chat
        return
    config = chat.checkpoint.config
    _limit(schema, "AttentionRequest", "layer", maximum=config.n_layers - 1)
    _limit(schema, "AttentionRequest", "head", maximum=config.n_heads - 1)
    token_ids = _property(schema, "NextTokenRequest", "token_ids")
    if token_ids is not None:
        token_ids.get("items", {})["maximum"] = config.vocab_size - 1
        token_ids["maxItems"] = min(token_ids.get("maxItems", config.context_length), config.context_length)


def install_openapi(app: FastAPI, settings: Settings) -> None:
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        _limit(schema, "ClassifyRequest", "text", maxLength=settings.max_classify_chars)
        _limit(schema, "ClassifyBatchRequest", "texts", maxItems=settings.max_classify_batch)
        _limit(schema, "ClassifyBatchRequest", "texts", maxLength=settings.max_classify_chars)
        _limit(schema, "MessageCreate", "content", maxLength=settings.max_message_chars)
        for model in ("ConversationCreate", "ConversationUpdate"):
            _limit(schema, model, "max_new_tokens", maximum=settings.max_new_tokens_cap)
        for field in ("max_tokens", "max_completion_tokens"):
            _limit(schema, "ChatCompletionRequest", field, maximum=settings.max_new_tokens_cap)
        if not settings.api_keys:
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    if isinstance(operation, dict):
                        operation.pop("security", None)
            schema.get("components", {}).pop("securitySchemes", None)
        _model_limits(schema, app)
        models = getattr(app.state, "models", None)
        # While a model loads its limits are unknown: build the document again on the next request.
        app.openapi_schema = None if models is not None and models.loading else schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
