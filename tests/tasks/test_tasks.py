"""Tests for opcd.tasks: answer parsing, task scores, and the language identifier (French, Spanish, German)."""

import pytest

from opcd.errors import ConfigError, DataError
from opcd.tasks import TASKS, get_task
from opcd.tasks.language import LanguageTask, detect_language, language_name, language_score
from opcd.tasks.sysprompt import (
    MedMCQATask,
    SafetyTask,
    medmcqa_user_message,
    parse_answer_tag,
    parse_choice_letter,
    parse_yes_no,
)


def user_row(text: str, answer: str | None) -> dict:
    return {"content": [{"role": "user", "content": text}], "answer": answer}


# --- get_task ---------------------------------------------------------------


def test_get_task_returns_each_registered_task_by_name():
    for name in ("medmcqa", "safety", "language"):
        assert get_task(name).name == name


def test_get_task_unknown_lists_choices():
    with pytest.raises(ConfigError, match=r"unknown task 'chess'; expected one of: language, math, medmcqa, safety"):
        get_task("chess")


def test_student_messages_are_a_copy_of_content():
    row = {
        "content": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
        "answer": "fr",
    }
    for task in TASKS.values():
        messages = task.student_messages(row)
        assert messages == row["content"]
        messages[0]["content"] = "changed"
        assert row["content"][0]["content"] == "Be brief."


# --- medmcqa ----------------------------------------------------------------


def test_medmcqa_user_message_golden():
    text = medmcqa_user_message("Which organ makes bile?", ["Liver", "Spleen", "Kidney", "Lung"])
    assert text == (
        "Which organ makes bile?\n\n"
        "A) Liver\nB) Spleen\nC) Kidney\nD) Lung\n\n"
        "Think through the options briefly, then give the letter of the single best option "
        "inside <answer></answer> tags."
    )


def test_medmcqa_user_message_needs_options():
    with pytest.raises(ValueError, match="needs 1-26 options, got 0"):
        medmcqa_user_message("Q?", [])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<answer>B</answer>", "B"),
        ("reasoning... <ANSWER>  c  </Answer>", "c"),
        ("first <answer>A</answer> then <answer>D</answer>", "D"),
        ("<answer>\nB) Radial nerve\n</answer>", "B) Radial nerve"),
        ("no tags at all", None),
        ("<answer>   </answer>", None),
        ("<answer>B", None),
        ("", None),
    ],
)
def test_parse_answer_tag(text, expected):
    assert parse_answer_tag(text) == expected


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("B", "B"),
        (" B) Radial nerve", "B"),
        ("(C)", "C"),
        ("D. Furosemide", "D"),
        ("b", "B"),
        ("c)", "C"),
        ("Option A", "A"),
        ("The answer is: D", "D"),
        ("a fracture of the radius", None),  # the article "a", not option A
        ("Both A and C", None),
        ("Radial nerve", None),
        (None, None),
    ],
)
def test_parse_choice_letter(answer, expected):
    assert parse_choice_letter(answer) == expected


def test_medmcqa_score():
    task = MedMCQATask()
    row = user_row("Q", "B")
    assert task.score("The radial groove... <answer> B) Radial nerve</answer>", row) == 1.0
    assert task.score("<answer>C</answer>", row) == 0.0
    assert task.score("I think it is B.", row) == 0.0  # no tag: not an answer
    assert task.score("<answer>B</answer> wait, <answer>A</answer>", row) == 0.0  # last tag counts


def test_medmcqa_score_needs_answer():
    with pytest.raises(DataError, match="medmcqa row needs a string 'answer' to be scored, got None"):
        MedMCQATask().score("<answer>B</answer>", user_row("Q", None))


# --- safety -----------------------------------------------------------------


@pytest.mark.parametrize(
    "answer, expected",
    [("yes", "yes"), ("No", "no"), (" YES.", "yes"), ("no, it is harmless", "no"), ("nope", None), ("maybe", None), (None, None)],
)
def test_parse_yes_no(answer, expected):
    assert parse_yes_no(answer) == expected


def test_safety_score():
    task = SafetyTask()
    assert task.score("This would hurt someone. <answer>Yes</answer>", user_row("Q", "yes")) == 1.0
    assert task.score("<answer>no</answer>", user_row("Q", "yes")) == 0.0
    assert task.score("<answer>NO</answer>", user_row("Q", "no")) == 1.0
    assert task.score("no", user_row("Q", "no")) == 0.0


# --- language ---------------------------------------------------------------

FRENCH_SENTENCES = [
    "Le ciel est bleu parce que l'air diffuse surtout la lumière bleue du soleil.",
    "Pour bien dormir, il faut éviter les écrans avant de se coucher.",
    "C'est une très bonne question, et la réponse dépend de la saison.",
    "Les chats ronronnent quand ils sont contents, mais aussi quand ils ont peur.",
    "Vous pouvez faire cuire l'œuf pendant six minutes dans l'eau bouillante.",
    "Nous conseillons de boire un verre d'eau toutes les heures.",
    "Je pense qu’il faut arroser un cactus une fois par mois en hiver.",
    "Un bon petit-déjeuner avant une course : du pain, une banane et du thé.",
    "La capitale du Japon est Tokyo.",
]

SPANISH_SENTENCES = [
    "El cielo es azul porque el aire dispersa sobre todo la luz azul del sol.",
    "Para dormir bien, hay que evitar las pantallas antes de acostarse.",
    "Los gatos ronronean cuando están contentos, pero también cuando tienen miedo.",
    "Puedes cocer el huevo durante seis minutos en agua hirviendo.",
    "La capital de Japón es Tokio y es una ciudad muy grande.",
]

GERMAN_SENTENCES = [
    "Der Himmel ist blau, weil die Luft vor allem das blaue Licht der Sonne streut.",
    "Um gut zu schlafen, sollte man vor dem Zubettgehen keine Bildschirme benutzen.",
    "Katzen schnurren, wenn sie zufrieden sind, aber auch, wenn sie Angst haben.",
    "Du kannst das Ei sechs Minuten lang in kochendem Wasser garen.",
    "Die Hauptstadt von Japan ist Tokio und sie ist sehr groß.",
]

ENGLISH_SENTENCES = [
    "The sky is blue because air scatters blue light from the sun more than red light.",
    "To sleep well, you should avoid screens for an hour before bed.",
    "That is a great question, and the answer depends on the season.",
    "Cats purr when they are content, but also when they are scared.",
    "You can boil the egg for six minutes in water that is already bubbling.",
    "We recommend drinking a glass of water every hour.",
    "I think it's best to water a cactus once a month in winter.",
    "A good breakfast before a run: some toast, a banana and tea.",
    "The capital of Japan is Tokyo.",
    "Don't worry, it's fine.",
]

BY_LANGUAGE = {"fr": FRENCH_SENTENCES, "es": SPANISH_SENTENCES, "de": GERMAN_SENTENCES, "en": ENGLISH_SENTENCES}


@pytest.mark.parametrize("code", ["fr", "es", "de"])
def test_language_task_scores_its_language_one_and_the_others_zero(code):
    task = get_task("language", code)
    row = user_row("Why do cats purr?", None)
    for language, sentences in BY_LANGUAGE.items():
        for sentence in sentences:
            assert task.score(sentence, row) == (1.0 if language == code else 0.0), (code, sentence)


@pytest.mark.parametrize("text, expected", [
    ("", 0.0),
    ("   \n ", 0.0),
    ("12345 !!!", 0.0),  # nothing to judge
    ("Bonjour! The answer is that the sky is blue because of the air.", 0.0),  # mostly English
    ("Yes, the café on the corner is near the église.", 0.0),  # French loanwords in English
    ("Le ciel est bleu et la mer est calme. The sun.", 1.0),  # mainly French
])
def test_french_edge_cases(text, expected):
    assert language_score(text, "fr") == expected


def test_very_short_answers_are_unreliable():
    """A documented limit of the n-gram identifier (module docstring), pinned so a change is noticed."""
    assert detect_language("Très bien, merci !") == "ca"


def test_detection_is_deterministic():
    text = "Le ciel est bleu. The sun is bright."  # close to a tie: langdetect's random trials could flip it
    assert len({detect_language(text) for _ in range(20)}) == 1


def test_language_rows_carry_no_code_or_the_tasks_code():
    task = LanguageTask("es")
    assert task.score(SPANISH_SENTENCES[0], user_row("Q", "es")) == 1.0
    with pytest.raises(ValueError, match=r"row 'answer' must be null or task.language='es', got 'fr'"):
        task.score(SPANISH_SENTENCES[0], user_row("Q", "fr"))


def test_unsupported_language_codes_are_refused():
    with pytest.raises(ValueError, match=r"unsupported language code 'xx'; expected one of af, ar, "):
        LanguageTask("xx")
    assert language_name("de") == "German" and language_name("zh-cn") == "Simplified Chinese"


def test_task_language_fills_the_teachers_system_prompt(tmp_path):
    from pathlib import Path

    from opcd.config import load_config
    from opcd.data.contexts import load_context, read_context_file
    from opcd.tasks import context_placeholders

    prompts = Path(__file__).resolve().parents[2] / "system_prompts"
    count = lambda text: len(text.split())  # noqa: E731
    for code, name in (("fr", "French"), ("es", "Spanish"), ("de", "German")):
        cfg = load_config([f"task.language={code}"])
        assert cfg.task.language == code and cfg.task.context_path == "system_prompts/language.txt"
        (text,) = load_context("system_prompt", str(prompts / "language.txt"), 100, count,
                               context_placeholders(code)).texts
        assert f"Always reply in {name}," in text and "{" not in text
    # the demo's teacher prompt is unchanged: the template filled with French reads as french.txt
    (text,) = load_context("system_prompt", str(prompts / "language.txt"), 100, count,
                           context_placeholders("fr")).texts
    assert text == read_context_file(prompts / "french.txt")
    experience = tmp_path / "exp.txt"
    experience.write_text("[exp] answer in {language}\n")  # experience text is never rewritten
    assert load_context("experience", str(experience), 100, count, context_placeholders("es")).texts == (
        "[exp] answer in {language}",)


def test_task_language_must_be_a_known_code():
    from opcd.config import load_config

    with pytest.raises(ConfigError, match=r"^config task.language='xx': expected a language code langdetect knows: "):
        load_config(["task.language=xx"])
