"""Tests for opcd.tasks: answer parsing, task scores, and the French-language heuristic."""

import pytest

from opcd.errors import ConfigError, DataError
from opcd.tasks import TASKS, get_task
from opcd.tasks.language import LanguageTask, french_score, language_hits, words
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
    "Très bien, merci !",
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


@pytest.mark.parametrize("sentence", FRENCH_SENTENCES)
def test_french_sentences_score_one(sentence):
    assert french_score(sentence) == 1.0


@pytest.mark.parametrize("sentence", ENGLISH_SENTENCES)
def test_english_sentences_score_zero(sentence):
    assert french_score(sentence) == 0.0


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", 0.0),
        ("   \n ", 0.0),
        ("12345 !!!", 0.0),
        ("Bonjour", 0.0),  # a single greeting is not a French answer
        ("Bonjour! The answer is that the sky is blue because of the air.", 0.0),  # mostly English
        ("Yes, the café on the corner is near the église.", 0.0),  # French loanwords in English
        ("Le ciel est bleu. The sun is bright.", 0.0),  # tie-ish mix: not MAINLY French
        ("Le ciel est bleu et la mer est calme. The sun.", 1.0),  # mainly French
        ("LE CIEL EST BLEU ET TRÈS BEAU.", 1.0),  # case-insensitive, accents kept
    ],
)
def test_french_score_edge_cases(text, expected):
    assert french_score(text) == expected


def test_elisions_split_on_both_apostrophes_but_english_contractions_do_not_count():
    assert words("L’eau c'est") == ["l’eau", "c'est"]
    assert language_hits("l’eau") == (1, 0)  # the elided article
    assert language_hits("c'est") == (2, 0)  # c' + est
    assert language_hits("don't it's I'd") == (0, 2)  # "it" and "i" are English; "t", "s", "d" count for neither


def test_accented_words_add_a_bonus():
    assert language_hits("été") == (1, 0)
    assert language_hits("très") == (2, 0)  # function word + accent bonus


def test_language_task_scores_french_for_fr_rows():
    task = LanguageTask()
    row = user_row("Why do cats purr?", "fr")
    assert task.score(FRENCH_SENTENCES[3], row) == 1.0
    assert task.score(ENGLISH_SENTENCES[3], row) == 0.0


def test_language_task_rejects_other_targets():
    with pytest.raises(ValueError, match=r"one of \['fr'\], got 'de'"):
        LanguageTask().score("Hallo", user_row("Q", "de"))
