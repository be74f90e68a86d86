"""The CPU demo task: answer in a target language (French) that the student is not told about.

The teacher sees a system prompt asking for French; the student sees only the
question. A response scores 1.0 when it is written mainly in French, judged by
`french_score`, a transparent word-count heuristic rather than a model, so the
metric is cheap, deterministic and easy to audit. It separates French from
English only: other Romance languages share words such as "la" and "se" and
may be scored as French.
"""

import re
from dataclasses import dataclass
from typing import Callable

# Short, frequent French words that are NOT also common English words
# ("a", "on", "son", "car", "plus", "me" are left out for that reason).
FRENCH_WORDS = frozenset(
    """
    le la les un une des du au aux de et est sont ou où mais donc ni
    pour dans par sur sous avec sans chez vers entre que qui quoi dont
    ne pas rien jamais toujours très bien aussi peu beaucoup trop encore
    il elle ils elles je tu nous vous lui leur leurs eux se
    ce cet cette ces cela ça ceci mon ma mes ton ta tes sa ses notre votre nos vos
    être avoir fait faire peut peuvent suis es sommes êtes ont ai avez était sera
    comme quand comment pourquoi parce alors puis ainsi si tout tous toute toutes
    même autre autres chaque quelque quelques
    """.split()
)

ENGLISH_WORDS = frozenset(
    """
    the is are was were be been being and of to in it its you your for with
    that this these those on at as by from have has had not but or they them
    their we our he she his her i my me can will would should could there
    what which when how why who an do does did if so than then also just
    about into because very more some any all
    """.split()
)

# Elided French articles and pronouns: the "l" of "l'eau", "qu" of "qu'il".
# Only the part BEFORE an apostrophe is checked against this list, so English
# contractions ("don't", "it's", "I'd") do not count as French.
FRENCH_ELISIONS = frozenset({"l", "d", "j", "qu", "n", "c", "s", "m", "t", "jusqu", "lorsqu", "puisqu"})

FRENCH_ACCENTS = frozenset("éèêëàâçùûüîïôœ")

# A word is a run of letters (accented ones included), optionally joined by
# straight or curly apostrophes: "l'eau", "aujourd’hui", "don't".
_WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*")
_APOSTROPHE = re.compile(r"['’]")


def words(text: str) -> list[str]:
    """Lower-case words of `text`, accented letters kept, apostrophes kept inside words."""
    return _WORD.findall(text.lower())


def language_hits(text: str) -> tuple[int, int]:
    """(french_hits, english_hits) for `text`.

    French hits: French function words, elided prefixes ("l'", "qu'", ...) and
    one bonus per word containing a French accented letter. "c'est" therefore
    counts twice (the elision "c'" and "est").
    """
    french = english = 0
    for word in words(text):
        parts = _APOSTROPHE.split(word)
        if len(parts) > 1 and parts[0] in FRENCH_ELISIONS:
            french += 1
            parts = parts[1:]
        for part in parts:
            french += part in FRENCH_WORDS
            english += part in ENGLISH_WORDS
        if any(char in FRENCH_ACCENTS for char in word):
            french += 1
    return french, english


def french_score(text: str) -> float:
    """1.0 if `text` is written mainly in French (>= 2 French hits, more than English hits), else 0.0."""
    french, english = language_hits(text)
    return 1.0 if french >= 2 and french > english else 0.0


LANGUAGE_SCORERS: dict[str, Callable[[str], float]] = {"fr": french_score}


@dataclass(frozen=True)
class LanguageTask:
    """Answer in the row's target language (`answer` holds its code, e.g. "fr")."""

    name: str = "language"

    def student_messages(self, row: dict) -> list[dict]:
        return [dict(message) for message in row["content"]]

    def answer_problem(self, answer: str | None) -> str | None:
        return None if answer in LANGUAGE_SCORERS else f"a target language code, one of {sorted(LANGUAGE_SCORERS)}"

    def score(self, response: str, row: dict) -> float:
        target = row.get("answer")
        scorer = LANGUAGE_SCORERS.get(target)  # type: ignore[arg-type]
        if scorer is None:
            raise ValueError(
                "language task: row 'answer' must be a target language code, "
                f"one of {sorted(LANGUAGE_SCORERS)}, got {target!r}"
            )
        return scorer(response)
