"""The CPU demo task: answer in a target language that the student is not told about.

The teacher sees a system prompt asking for the language (`task.language`, an ISO 639-1 code; the
bundled demo is French); the student sees only the question. A response scores 1.0 when a language
identifier names the target language as the most likely one. The identifier is `langdetect` (a port
of Google's language-detection, 55 languages, character n-grams; installed with lm-eval's ifeval
extra and pinned in pyproject.toml), seeded so a text always gets the same decision. It is reliable on
a sentence or more and unreliable on two or three words ("Très bien, merci !" reads as Catalan).

The system prompt file may contain `{language}`: it is replaced by the target language's English
name (system_prompts/language.txt; with `fr` it reads exactly as system_prompts/french.txt).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

# langdetect's languages (the profiles it ships) and their English names, for the teacher's prompt
LANGUAGE_NAMES = {
    "af": "Afrikaans", "ar": "Arabic", "bg": "Bulgarian", "bn": "Bengali", "ca": "Catalan", "cs": "Czech",
    "cy": "Welsh", "da": "Danish", "de": "German", "el": "Greek", "en": "English", "es": "Spanish",
    "et": "Estonian", "fa": "Persian", "fi": "Finnish", "fr": "French", "gu": "Gujarati", "he": "Hebrew",
    "hi": "Hindi", "hr": "Croatian", "hu": "Hungarian", "id": "Indonesian", "it": "Italian", "ja": "Japanese",
    "kn": "Kannada", "ko": "Korean", "lt": "Lithuanian", "lv": "Latvian", "mk": "Macedonian",
    "ml": "Malayalam", "mr": "Marathi", "ne": "Nepali", "nl": "Dutch", "no": "Norwegian", "pa": "Punjabi",
    "pl": "Polish", "pt": "Portuguese", "ro": "Romanian", "ru": "Russian", "sk": "Slovak", "sl": "Slovenian",
    "so": "Somali", "sq": "Albanian", "sv": "Swedish", "sw": "Swahili", "ta": "Tamil", "te": "Telugu",
    "th": "Thai", "tl": "Tagalog", "tr": "Turkish", "uk": "Ukrainian", "ur": "Urdu", "vi": "Vietnamese",
    "zh-cn": "Simplified Chinese", "zh-tw": "Traditional Chinese",
}

_LOCK = threading.Lock()  # langdetect's factory is a module-level singleton


def language_name(code: str) -> str:
    """English name of a supported language code; ValueError naming the choices otherwise."""
    if code not in LANGUAGE_NAMES:
        raise ValueError(f"unsupported language code {code!r}; expected one of {', '.join(LANGUAGE_NAMES)}")
    return LANGUAGE_NAMES[code]


def detect_language(text: str) -> str | None:
    """The most likely language code of `text`, or None when it has nothing to judge (no letters)."""
    from langdetect import DetectorFactory, LangDetectException, detect

    with _LOCK:
        DetectorFactory.seed = 0  # langdetect samples n-grams at random: seeded, a text gets one answer
        try:
            return detect(text)
        except LangDetectException:
            return None


def language_score(text: str, code: str) -> float:
    """1.0 if `text` is written in the language `code` (langdetect's first choice), else 0.0."""
    return 1.0 if detect_language(text) == code else 0.0


@dataclass(frozen=True)
class LanguageTask:
    """Answer in `language`. A row's `answer` is null (the task's language) or that same code."""

    language: str = "fr"
    name: str = "language"

    def __post_init__(self):
        language_name(self.language)

    def student_messages(self, row: dict) -> list[dict]:
        return [dict(message) for message in row["content"]]

    def answer_format_error(self, answer: str | None) -> str | None:
        return None if answer in (None, self.language) else f"null or task.language={self.language!r}"

    def score(self, response: str, row: dict) -> float:
        target = row.get("answer")
        if target is not None and target != self.language:
            raise ValueError(f"language task: row 'answer' must be null or task.language={self.language!r}, "
                             f"got {target!r}")
        return language_score(response, self.language)
