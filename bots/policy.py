"""Conversation policy: opt-out and opt-in keywords, "talk to a human", per-contact limits, the
AI disclosure and every other fixed text (notice), localized, with language detection.

Pure functions and defaults; the pipeline applies them. Bots override any of it in YAML
(``policy:`` and ``notices:``), stored in ``bots.extra``.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

LANGUAGES = ("en", "es", "de", "fr", "pt", "it", "hi")

DEFAULT_OPT_OUT = (
    "stop",
    "unsubscribe",
    "stop all",
    "end",
    "cancel",
    "quit",  # en
    "baja",
    "parar",
    "alto",
    "cancelar",  # es
    "stopp",
    "abmelden",  # de
    "arret",
    "arrêt",
    "desabonner",
    "désabonner",  # fr
    "sair",
    "cancelar inscrição",  # pt
    "annulla",
    "basta",
    "disiscrivi",  # it
    "रोकें",
    "बंद करें",  # hi
)
DEFAULT_OPT_IN = (
    "start",
    "unstop",
    "alta",
    "start again",
    "iniciar",
    "abonnieren",
    "démarrer",
    "comecar",
    "começar",
    "inizia",
    "शुरू",
)
DEFAULT_HUMAN = (
    "talk to a human",
    "speak to a human",
    "human please",
    "real person",
    "agent please",
    "talk to an agent",
    "hablar con una persona",
    "hablar con un humano",
    "agente humano",
    "mit einem menschen sprechen",
    "mitarbeiter sprechen",
    "parler à un humain",
    "parler a un humain",
    "conseiller humain",
    "falar com um humano",
    "falar com atendente",
    "parlare con un operatore",
    "parlare con una persona",
    "इंसान से बात",
)

DEFAULT_NOTICES: dict[str, dict[str, str]] = {
    "disclosure": {
        "en": "Hi! You're chatting with an automated assistant.",
        "es": "¡Hola! Estás hablando con un asistente automático.",
        "de": "Hallo! Sie schreiben mit einem automatischen Assistenten.",
        "fr": "Bonjour ! Vous discutez avec un assistant automatique.",
        "pt": "Olá! Você está conversando com um assistente automático.",
        "it": "Ciao! Stai parlando con un assistente automatico.",
        "hi": "नमस्ते! आप एक स्वचालित सहायक से बात कर रहे हैं।",
    },
    "holding": {
        "en": "Thanks for your message. We're a little slow right now and will reply shortly.",
        "es": "Gracias por tu mensaje. Ahora vamos un poco lentos y te responderemos en breve.",
        "de": "Danke für Ihre Nachricht. Wir sind gerade etwas langsam und antworten gleich.",
        "fr": "Merci pour votre message. Nous sommes un peu lents et répondrons très vite.",
        "pt": "Obrigado pela mensagem. Estamos um pouco lentos e responderemos em breve.",
        "it": "Grazie del messaggio. Siamo un po' lenti e risponderemo a breve.",
        "hi": "आपके संदेश के लिए धन्यवाद। हम थोड़ी देर में जवाब देंगे।",
    },
    "opt_out": {
        "en": "You won't receive more messages from us. Reply START to opt back in.",
        "es": "No recibirás más mensajes nuestros. Responde ALTA para volver a suscribirte.",
        "de": "Sie erhalten keine Nachrichten mehr von uns. Antworten Sie START zum Anmelden.",
        "fr": "Vous ne recevrez plus de messages. Répondez START pour vous réabonner.",
        "pt": "Você não receberá mais mensagens. Responda START para voltar a receber.",
        "it": "Non riceverai più messaggi da noi. Rispondi START per iscriverti di nuovo.",
        "hi": "अब आपको हमारे संदेश नहीं मिलेंगे। फिर से शुरू करने के लिए START लिखें।",
    },
    "opt_in": {
        "en": "Welcome back! How can we help?",
        "es": "¡Bienvenido de nuevo! ¿En qué podemos ayudarte?",
        "de": "Willkommen zurück! Wie können wir helfen?",
        "fr": "Bon retour ! Comment pouvons-nous vous aider ?",
        "pt": "Bem-vindo de volta! Como podemos ajudar?",
        "it": "Bentornato! Come possiamo aiutarti?",
        "hi": "फिर से स्वागत है! हम कैसे मदद करें?",
    },
    "human": {
        "en": "A member of our team will take over this conversation shortly.",
        "es": "Una persona de nuestro equipo continuará esta conversación en breve.",
        "de": "Ein Mitglied unseres Teams übernimmt das Gespräch in Kürze.",
        "fr": "Un membre de notre équipe va reprendre cette conversation sous peu.",
        "pt": "Uma pessoa da nossa equipe vai continuar esta conversa em breve.",
        "it": "Un membro del nostro team prenderà in carico la conversazione a breve.",
        "hi": "हमारी टीम का कोई सदस्य जल्द ही यह बातचीत संभालेगा।",
    },
    "media": {
        "en": "I can't open images, voice notes, videos or files yet. Could you write it?",
        "es": "Aún no puedo abrir imágenes, audios, vídeos ni archivos. ¿Me lo escribes?",
        "de": "Bilder, Sprachnachrichten und Dateien kann ich noch nicht öffnen. Bitte schreiben.",
        "fr": "Je ne peux pas encore ouvrir images, vocaux, vidéos ou fichiers. Écrivez-le ?",
        "pt": "Ainda não abro imagens, áudios, vídeos ou arquivos. Pode escrever?",
        "it": "Non posso ancora aprire immagini, vocali, video o file. Me lo scrivi?",
        "hi": "मैं अभी चित्र, वॉइस नोट या फ़ाइलें नहीं खोल सकता। कृपया लिखकर भेजें।",
    },
    "unsupported": {
        "en": "Sorry, I can't read that kind of message. Could you send it as text?",
        "es": "Lo siento, no puedo leer ese tipo de mensaje. ¿Puedes enviarlo como texto?",
        "de": "Diese Nachricht kann ich leider nicht lesen. Können Sie sie als Text senden?",
        "fr": "Désolé, je ne peux pas lire ce message. Pouvez-vous l'envoyer en texte ?",
        "pt": "Desculpe, não consigo ler esse tipo de mensagem. Pode enviar como texto?",
        "it": "Mi dispiace, non posso leggere questo messaggio. Puoi inviarlo come testo?",
        "hi": "क्षमा करें, मैं यह संदेश नहीं पढ़ सकता। क्या आप इसे टेक्स्ट में भेज सकते हैं?",
    },
    "limit": {
        "en": "You've sent a lot of messages. Please wait a while before writing again.",
        "es": "Has enviado muchos mensajes. Espera un poco antes de volver a escribir.",
        "de": "Sie haben viele Nachrichten gesendet. Bitte warten Sie etwas.",
        "fr": "Vous avez envoyé beaucoup de messages. Merci de patienter un peu.",
        "pt": "Você enviou muitas mensagens. Aguarde um pouco antes de escrever de novo.",
        "it": "Hai inviato molti messaggi. Attendi un po' prima di scrivere ancora.",
        "hi": "आपने बहुत संदेश भेजे हैं। कृपया थोड़ी देर बाद लिखें।",
    },
}


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    messages_per_minute: int = Field(20, ge=1)
    tokens_per_day: int = Field(50_000, ge=1)
    # Limit episodes in a day after which moderators are asked to consider a block.
    propose_block_after: int = Field(3, ge=1)


class Policy(BaseModel):
    """A bot's conversation policy (YAML ``policy:``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    language: str = "en"
    burst_window_seconds: float = Field(2.0, ge=0, le=30)
    holding_after_seconds: float = Field(60.0, ge=0)
    human_idle_timeout_minutes: float = Field(60.0, gt=0)
    window_hours: float = Field(24.0, gt=0)
    opt_out_keywords: tuple[str, ...] = DEFAULT_OPT_OUT
    opt_in_keywords: tuple[str, ...] = DEFAULT_OPT_IN
    human_keywords: tuple[str, ...] = DEFAULT_HUMAN
    limits: Limits = Limits()
    disclose_ai: bool = True
    notices: dict[str, dict[str, str]] = Field(default_factory=dict)

    def notice(self, kind: str, language: str | None) -> str:
        """The notice text in ``language``, else the bot's language, else English."""
        for table in (self.notices.get(kind, {}), DEFAULT_NOTICES.get(kind, {})):
            for lang in (language, self.language, "en"):
                if lang and lang in table:
                    return table[lang]
        raise KeyError(f"no text for notice {kind!r}")


def policy_of(extra: Mapping[str, Any] | None) -> Policy:
    return Policy.model_validate((extra or {}).get("policy", {}))


def normalize(text: str) -> str:
    """Case-folded, accent-insensitive, punctuation-free, single-spaced."""
    folded = unicodedata.normalize("NFKD", text.casefold())
    kept = "".join(
        c
        for c in folded
        if not unicodedata.combining(c)
        or unicodedata.category(c) in ("Mc", "Mn")
        and ord(c) > 0x900
    )
    return re.sub(r"[\W_]+", " ", kept).strip()


def _keyword_set(words: Iterable[str]) -> frozenset[str]:
    return frozenset(normalize(w) for w in words)


def is_command(text: str, keywords: Iterable[str]) -> bool:
    """True when the whole message is one of the keywords (``STOP``, ``Baja.``, ``stop!``)."""
    return normalize(text) in _keyword_set(keywords)


def asks_for_human(text: str, phrases: Iterable[str]) -> bool:
    """True when the message contains one of the "talk to a human" phrases."""
    words = f" {normalize(text)} "
    return any(f" {p} " in words for p in _keyword_set(phrases) if p)


@lru_cache(maxsize=1)
def _identifier() -> Any:
    from py3langid.langid import _load_identifier

    # The model ships inside the wheel; restricting it to our languages makes it far steadier.
    return _load_identifier(norm_probs=True, langs=list(LANGUAGES))


def detect_language(text: str, *, min_chars: int = 8, min_prob: float = 0.7) -> str | None:
    """The message's language among :data:`LANGUAGES`, or None when too short or unsure."""
    letters = sum(ch.isalpha() for ch in text)
    if letters < min_chars:
        return None
    lang, prob = _identifier().classify(text)
    return str(lang) if prob >= min_prob else None
