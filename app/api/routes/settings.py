"""The chat settings this server accepts, and what a new chat gets: what the settings form uses."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.api.deps import SettingsDep
from app.schemas import ChatDefaults, ChatSettings, ConversationCreate, Limit

router = APIRouter(prefix="/api/v1", tags=["conversations"])

LIMITED = ("temperature", "top_k", "top_p", "max_new_tokens")


def _schema_limit(field: dict[str, Any]) -> Limit:
    """A field's range as the request schema states it (its non-null branch)."""
    branch = next((b for b in field.get("anyOf", [field]) if b.get("type") != "null"), field)
    low = branch.get("minimum", branch.get("exclusiveMinimum"))
    return Limit(minimum=low, maximum=branch["maximum"], exclusive_minimum="exclusiveMinimum" in branch)


@router.get("/settings", response_model=ChatSettings)
def chat_settings(settings: SettingsDep) -> ChatSettings:
    """The range of each conversation setting (the same the API checks, so a form can stay inside
    it; ``max_new_tokens`` ends at SCRATCHGPT_MAX_NEW_TOKENS_CAP) and the defaults of a new chat."""
    fields = ConversationCreate.model_json_schema()["properties"]
    limits = {name: _schema_limit(fields[name]) for name in LIMITED}
    limits["max_new_tokens"].maximum = min(limits["max_new_tokens"].maximum, settings.max_new_tokens_cap)
    return ChatSettings(
        limits=limits,
        max_system_prompt_chars=fields["system_prompt"]["anyOf"][0]["maxLength"],
        max_message_chars=settings.max_message_chars,
        defaults=ChatDefaults(
            system_prompt=settings.default_system_prompt,
            temperature=settings.default_temperature,
            top_k=settings.default_top_k,
            top_p=settings.default_top_p,
            max_new_tokens=min(settings.default_max_new_tokens, settings.max_new_tokens_cap),
        ),
    )
