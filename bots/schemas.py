"""The bots YAML format (``parley bots apply -f bots.yaml``), validated with pydantic."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from bots.policy import Policy


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MetaAppSpec(_Strict):
    name: str = Field(min_length=1, max_length=100)
    app_id: str | None = None
    app_secret: str = Field(min_length=1)
    verify_token: str = Field(min_length=1)
    # Each channel's handshake uses its own token when given, else ``verify_token``.
    messenger_verify_token: str | None = Field(None, min_length=1)
    instagram_verify_token: str | None = Field(None, min_length=1)
    # Signs /webhooks/instagram instead of ``app_secret`` when set: Instagram API with
    # Instagram Login may sign with the Instagram app's secret (UNVERIFIED).
    instagram_app_secret: str | None = Field(None, min_length=1)


class GenerationSpec(_Strict):
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    max_tokens: int = Field(256, ge=1, le=8192)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None


class MemorySpec(_Strict):
    """Conversation memory (``bots/memory.py``); a field left unset takes its
    ``PARLEY_MEMORY_*`` setting. ``context_tokens`` is the served model's window (the server's
    own figure wins when smaller); ``summary_prompt`` instructs the model that folds old turns
    into the summary."""

    context_tokens: int | None = Field(None, ge=256, le=1_048_576)
    margin_tokens: int | None = Field(None, ge=0, le=65_536)
    summary_tokens: int | None = Field(None, ge=16, le=4096)
    summary_prompt: str | None = Field(None, min_length=1, max_length=4000)


class ChannelSpec(_Strict):
    type: Literal["whatsapp", "messenger", "instagram"]
    app: str
    access_token: str = Field(min_length=1)
    phone_number_id: str | None = None
    page_id: str | None = None
    instagram_account_id: str | None = None

    @model_validator(mode="after")
    def _one_id(self) -> ChannelSpec:
        needed = {
            "whatsapp": "phone_number_id",
            "messenger": "page_id",
            "instagram": "instagram_account_id",
        }[self.type]
        if not getattr(self, needed):
            raise ValueError(f"a {self.type} channel needs {needed}")
        return self

    @property
    def external_id(self) -> str:
        return self.phone_number_id or self.page_id or self.instagram_account_id or ""


class TemplateSpec(_Strict):
    """A WhatsApp message template, sent when a reply could only go out after the 24-hour
    window closed. It is sent only while its status (from template status webhooks) is
    APPROVED for the channel's Meta app (and ``waba_id``, when given)."""

    name: str = Field(min_length=1, max_length=512, pattern=r"^[a-z0-9_]+$")
    language: str = Field(min_length=2, max_length=32, pattern=r"^[A-Za-z]{2,3}(_[A-Za-z0-9]+)*$")
    waba_id: str | None = Field(None, min_length=1, max_length=64)
    # The body's {{1}}, {{2}}, … in order; none may be blank.
    parameters: list[Annotated[str, Field(min_length=1, max_length=1024, pattern=r"\S")]] = Field(
        default_factory=list, max_length=100
    )


class BotSpec(_Strict):
    name: str = Field(min_length=1, max_length=100)
    system_prompt: str = Field(min_length=1)
    model: str | None = None
    generation: GenerationSpec = GenerationSpec()
    # The most stored messages a prompt carries word for word; past it (or past the token
    # budget) the oldest fold into the conversation's summary.
    history_turns: int = Field(40, ge=0, le=200)
    # What the business bot is for (WhatsApp allows no general-purpose assistants): the prompt
    # tells the model to decline anything else.
    scope: str | None = Field(None, min_length=1, max_length=1000)
    memory: MemorySpec = MemorySpec()
    fallback_reply: str = "Sorry, I can't help with that right now."
    policy: Policy = Policy()
    channels: list[ChannelSpec] = Field(default_factory=list)
    # WhatsApp only: sent instead of a reply once the 24-hour window has closed.
    window_template: TemplateSpec | None = None


class BotsFile(_Strict):
    workspace: str = Field("default", min_length=1, max_length=100)
    meta_apps: list[MetaAppSpec] = Field(default_factory=list)
    bots: list[BotSpec] = Field(default_factory=list)

    def reference_errors(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Cross-references pydantic cannot check field by field: (location, message) pairs."""
        errors: list[tuple[tuple[str | int, ...], str]] = []
        apps: set[str] = set()
        for i, app in enumerate(self.meta_apps):
            if app.name in apps:
                errors.append(
                    (("meta_apps", i, "name"), f"meta app {app.name!r} is declared twice")
                )
            apps.add(app.name)
        bots: set[str] = set()
        seen: set[tuple[str, str]] = set()
        for i, bot in enumerate(self.bots):
            if bot.name in bots:
                errors.append((("bots", i, "name"), f"bot {bot.name!r} is declared twice"))
            bots.add(bot.name)
            for j, channel in enumerate(bot.channels):
                if channel.app not in apps:
                    errors.append(
                        (("bots", i, "channels", j, "app"), f"unknown meta app {channel.app!r}")
                    )
                key = (channel.type, channel.external_id)
                if key in seen:
                    errors.append(
                        (
                            ("bots", i, "channels", j),
                            f"{channel.type} account {channel.external_id} is declared twice",
                        )
                    )
                seen.add(key)
        return errors
