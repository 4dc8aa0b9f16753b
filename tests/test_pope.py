"""POPE scoring against hand-counted confusion matrices."""
import pytest

from llava_jax.eval.pope import pope_answer, pope_by_category, pope_scores


@pytest.mark.parametrize("text,expected", [
    ("Yes, there is a dog in the image.", "yes"),
    ("No, there is no dog.", "no"),
    ("There is not a dog in the image.", "no"),
    ("Yes. But no cat is visible.", "yes"),  # only the first sentence counts
    ("Nope", "yes"),  # not the word "No"
    ("No,there is none", "yes"),  # commas are removed, not replaced by spaces: "Nothere"
    ("NO.", "yes"),  # case-sensitive as the original
])
def test_pope_answer_rules(text, expected):
    assert pope_answer(text) == expected


def test_pope_scores_hand_counted():
    answers = ["Yes", "Yes", "No", "No", "Yes", "No"]
    labels = ["yes", "no", "no", "yes", "yes", "no"]
    s = pope_scores(answers, labels)  # TP=2 FP=1 TN=2 FN=1
    assert (s["tp"], s["fp"], s["tn"], s["fn"]) == (2, 1, 2, 1)
    assert s["accuracy"] == pytest.approx(4 / 6) and s["precision"] == pytest.approx(2 / 3)
    assert s["recall"] == pytest.approx(2 / 3) and s["f1"] == pytest.approx(2 / 3)
    assert s["yes_ratio"] == pytest.approx(0.5)
    degenerate = pope_scores(["No"] * 3, ["yes", "no", "yes"])
    assert degenerate["precision"] == 0.0 and degenerate["f1"] == 0.0 and degenerate["accuracy"] == pytest.approx(1 / 3)
    by = pope_by_category([("random", "Yes", "yes"), ("adversarial", "Yes", "no")])
    assert by["random"]["accuracy"] == 1.0 and by["adversarial"]["accuracy"] == 0.0 and by["all"]["n"] == 2


def test_toy_hallucination_judge():
    from llava_jax.eval.toy_judge import hallucinates, scene_objects

    objects = scene_objects(["There is a blue triangle in the top right and a red square in the bottom right."])
    assert objects == {("blue", "triangle"), ("red", "square")}
    assert not hallucinates("A blue triangle and a red square.", objects)
    assert hallucinates("A red triangle.", objects)  # wrong colour
    assert hallucinates("There is a circle.", objects)  # absent shape
    assert not hallucinates("No, there is no green cross.", objects)  # a denial is not a claim


def test_toy_describe_scores():
    """The held-out table's description columns, counted by hand on three answers."""
    from llava_jax.eval.toy_judge import describe_scores

    captions = [["There is a red circle in the top left and a blue square in the bottom right."]] * 3
    answers = ["There is a red circle in the top left and a blue square in the bottom right. "
               "There is also a green cross in the top right.",  # both shapes + one absent
               "There is a red circle in the top left.",  # faithful, incomplete
               "I cannot tell what is in the image."]  # nothing
    s = describe_scores(answers, captions)
    assert s["hallucinating_answers"] == pytest.approx(1 / 3) and s["absent_object_share"] == pytest.approx(1 / 4)
    assert s["recall"] == pytest.approx(3 / 6) and s["no_object_share"] == pytest.approx(1 / 3) and s["n"] == 3
