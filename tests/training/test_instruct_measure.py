"""The development measure's checkable-answer scorer on hand-made cases, and its conversations file."""

import json

import pytest

from training.instruct_measure import (
    DialogueError, answer_key, dialogue_correct, is_correct, quantities, read_dialogues, summarise,
)


def judge(instruction, reference, response, input_text=""):
    key = answer_key(instruction, input_text, reference)
    assert key is not None, f"{instruction!r} should be checkable"
    return is_correct(key, response)


def test_the_right_answer_in_another_frame_counts():
    assert judge("What is the opposite of 'wet'?", "The opposite of 'wet' is 'dry'.", "Dry.")
    assert judge("What is the opposite of 'wet'?", "The opposite of 'wet' is 'dry'.", "'Dry' is the opposite of wet.")
    assert judge("What is the capital of Russia?", "The capital of Russia is Moscow.", "Moscow is Russia's capital.")
    assert judge("Convert 45 kilograms to pounds.", "45 kilograms is approximately 99.21 pounds.", "About 99.2 lbs.")
    assert judge("What is the chemical formula for sulfuric acid?", "The chemical formula for sulfuric acid is H2SO4.",
                 "Sulfuric acid: H₂SO₄")
    assert judge("Perform a sentiment analysis on the given sentence.",
                 "The sentiment of the sentence \"I hate this song!\" is negative.", "Negative.", "I hate this song!")
    assert judge("Convert the time '1500 hours' into standard 12-hour clock format.",
                 "1500 hours is equivalent to 3:00 PM.", "It is 3 pm.")


def test_a_wrong_fact_in_the_references_frame_fails():
    # What the issue saw: the reference's sentence, the wrong fact. ROUGE-L scores these highly.
    assert not judge("Convert 45 kilograms to pounds.", "45 kilograms is approximately 99.21 pounds.",
                     "45 kilograms is approximately 9921 pounds.")
    assert not judge("What is the past tense of 'fly'?", "The past tense of 'fly' is 'flew'.",
                     "The past tense of 'fly' is 'fly'.")
    assert not judge("What is an antonym of 'happy'?", "An antonym of 'happy' is 'sad.'",
                     "An antonym of 'happy' is 'joyful'.")
    assert not judge("Convert 1000 milliliters to liters.", "1000 milliliters is equivalent to 1 liter.",
                     "1000 milliliters is equivalent to 1000 liters.")
    assert not judge("What is the chemical formula for ammonium nitrate?",
                     "The chemical formula for ammonium nitrate is NH4NO3.",
                     "The chemical formula for ammonium nitrate is Na2CO3.")
    assert not judge("What is the capital of Turkey?", "The capital of Turkey is Ankara.", "The capital of Turkey is Istanbul.")
    # A label task names one option; naming them all is no answer.
    assert not judge("Classify this speech as either formal or informal.", "This speech is formal.",
                     "This speech is informal.", "Could you please pass the salt?")
    assert not judge("Classify this speech as either formal or informal.", "This speech is formal.",
                     "It could be formal or informal.", "Could you please pass the salt?")


def test_case_only_changes():
    # Case does not change a word, but it is the whole task of "capitalize each word"...
    assert judge("What is the opposite of 'young'?", "The opposite of 'young' is 'old'.", "OLD")
    capitalise = ("Capitalize each word in the sentence.", "The Book Is On The Table")
    assert judge(*capitalise, "The Book Is On The Table.", input_text="the book is on the table")
    assert not judge(*capitalise, "the book is on the table", input_text="the book is on the table")
    # ... and of a chemical formula (CO is carbon monoxide, Co is cobalt).
    assert not judge("What is the chemical formula for carbon monoxide?",
                     "The chemical formula for carbon monoxide is CO.", "Co")


def test_numbers_with_units():
    assert quantities("It is 299,792 kilometers per second, or -161.5 °C, 2,000 mg and 25°C.") == [
        (299792.0, "km"), (-161.5, "C"), (2000.0, "mg"), (25.0, "C")]
    # The number must carry the reference's unit: 18.64 kilometers is not 18.64 miles.
    convert = ("Convert 30 kilometers to miles.", "30 kilometers is approximately 18.64 miles.")
    assert judge(*convert, "That is about 18.6 miles.")
    assert not judge(*convert, "30 kilometers is 18.64 kilometers.")
    # Degrees written either way; rounding within 2 %.
    boiling = ("What is the boiling point of methane in Celsius?", "The boiling point of methane is -161.5 degrees Celsius.")
    assert judge(*boiling, "-162 °C") and not judge(*boiling, "161.5 degrees Celsius")
    # The question's own number is not the answer.
    root = ("What is the cube root of 27?", "The cube root of 27 is 3.")
    assert judge(*root, "3") and not judge(*root, "The cube root of 27 is 27.")
    # A list of numbers needs every one of them.
    squares = ("What are the first 10 square numbers?", "1, 4, 9, 16, 25, 36, 49, 64, 81, 100.")
    assert judge(*squares, "1 4 9 16 25 36 49 64 81 100") and not judge(*squares, "1, 4, 9, 16, 25")


def test_the_asked_word_is_no_answer_unless_it_is_the_answer():
    assert not judge("What is the opposite of 'hot'?", "The opposite of 'hot' is 'cold'.", "The opposite of 'hot' is 'hot'.")
    sheep = ("What is the plural form of 'sheep'?", "The plural form of 'sheep' is 'sheep.'")
    assert judge(*sheep, "The plural of sheep is sheep.")
    assert not judge(*sheep, "The plural form of 'sheep' is 'sheeps'.")


def test_repeating_the_input_is_no_answer():
    verb = ("Identify the main verb in the sentence.", "The main verb in the sentence is 'danced'.")
    assert not judge(*verb, "She danced gracefully.", input_text="She danced gracefully.")
    assert judge(*verb, 'In "She danced gracefully." the verb is danced.', input_text="She danced gracefully.")


def test_a_quoted_paraphrase_of_the_input_names_no_label():
    topic = ("Classify this sentence into one of the following topics: health, economy, technology, music.",
             "The topic of the given sentence is music.")
    sentence = "Spotify has revolutionized how we listen to music."
    assert judge(*topic, "Music.", input_text=sentence)
    assert not judge(*topic, "The given sentence is: 'The company changed how we listen to music.'", input_text=sentence)


def test_open_ended_items_are_not_checked():
    assert answer_key("Rewrite the sentence using a metaphor.", "He is very wise.", "He is a fountain of wisdom.") is None
    assert answer_key("Generate a random sequence of 10 digits.", "", "9274036185.") is None
    assert answer_key("Name three types of biomes.", "", "Forest, desert, and grassland.") is None
    assert answer_key("Arrange the following events in chronological order: A, B.", "", "1. B\n2. A") is None


def test_summary_counts_by_kind():
    s = summarise([{"kind": "word", "correct": True}, {"kind": "word", "correct": False}, {"kind": "number", "correct": True}])
    assert s["n"] == 3 and s["correct"] == 2 and s["accuracy"] == pytest.approx(2 / 3)
    assert s["by_kind"] == {"number": {"n": 1, "correct": 1}, "word": {"n": 2, "correct": 1}}


def test_the_conversations_need_their_earlier_turns(tmp_path):
    dialogues = read_dialogues()
    assert len(dialogues) >= 20
    for d in dialogues:
        users = [m for m in d.messages if m["role"] == "user"]
        assert len(users) >= 2 and d.messages[-1]["role"] == "user"
        # The written earlier turns are the only context; the expected answer is never in the last question.
        assert not dialogue_correct(d, d.messages[-1]["content"]), d.id
        assert dialogue_correct(d, f"Sure: {d.expect[0]}."), d.id
    seconds = next(d for d in dialogues if d.id == "hours-seconds")
    assert dialogue_correct(seconds, "That is 7200 seconds.") and dialogue_correct(seconds, "7,200 s")
    assert not dialogue_correct(seconds, "120 minutes")


def test_a_bad_conversations_file_is_a_clear_error(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"messages": [{"role": "user", "content": "hi"}], "expect": ["x"]}]))
    with pytest.raises(DialogueError, match="entry 0: a conversation needs at least two user turns"):
        read_dialogues(path)
    path.write_text("[{")
    with pytest.raises(DialogueError, match="d.json"):
        read_dialogues(path)
