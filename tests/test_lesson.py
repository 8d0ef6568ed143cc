"""Lessons: the link and the file round-trip, a hostile lesson file is refused with a sentence,
and a student's answers come out as CSV."""

from __future__ import annotations

import csv
import json
import zipfile
from pathlib import Path

import pytest

import mirage_demo.lesson as lesson_module
from mirage_demo.lesson import (
    MAX_LESSON_SCANS,
    LessonError,
    lesson_code,
    parse_lesson_code,
    pick_scans,
    read_lesson_file,
    scan_code,
    write_lesson_file,
)
from mirage_demo.quiz import ANSWERS_HEADER, Quiz, QuizItem, write_answers_csv
from mirage_demo.testscans import scan_set_for
from mirage_demo.ui.context import EXAMPLES_DIR, example_scans

CLASSES = ["CNV", "DME", "DRUSEN", "NORMAL"]
DEMO = EXAMPLES_DIR.parent / "demo-model"


def test_a_link_gives_the_same_scans_in_the_same_order():
    scans, _ = scan_set_for(DEMO)
    chosen = [scans.entries[i] for i in (40, 3, 400, 211)]
    code = lesson_code([e.file for e in chosen])
    assert all(cls not in code for cls in CLASSES)  # the address gives no answer away
    for text in (code, f"https://x.hf.space/?lesson={code}", f" ?__theme=dark&lesson={code} "):
        assert pick_scans(parse_lesson_code(text), scans.entries) == chosen
    assert len({scan_code(e.file) for e in scans.entries}) == len(scans.entries)  # no clashes


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "Paste the lesson link"),
        ("https://x.hf.space/?lesson=", "Paste the lesson link"),
        ("https://x.hf.space/", "not a lesson code"),
        ("<script>alert(1)</script>", "not a lesson code"),
        ("abc", "not a lesson code"),
        ("-".join(["0123abcd"] * (MAX_LESSON_SCANS + 1)), "not a lesson code"),
    ],
)
def test_a_bad_code_is_a_sentence_that_echoes_nothing(text, message):
    with pytest.raises(LessonError, match=message) as caught:
        parse_lesson_code(text)
    assert "<script>" not in str(caught.value)


def test_a_code_for_other_scans_or_twice_the_same_is_refused():
    scans, _ = scan_set_for(DEMO)
    with pytest.raises(LessonError, match="1 of the 2 scans"):
        pick_scans(["00000000", scan_code(scans.entries[0].file)], scans.entries)
    twice = [scan_code(scans.entries[0].file)] * 2
    with pytest.raises(LessonError, match="twice"):
        pick_scans(twice, scans.entries)


def examples(n: int = 3) -> list[tuple[str, str]]:
    return example_scans()[:n]


def test_a_lesson_file_round_trips(tmp_path):
    scans = [examples(10)[i] for i in (7, 0, 4)]
    path = write_lesson_file(tmp_path / "lesson.zip", "  Week 3: fluid  ", scans)
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    assert names[0] == "lesson.json" and all(
        cls not in name for name in names[1:] for cls in CLASSES
    )  # file names give no answer away
    lesson = read_lesson_file(path, CLASSES, tmp_path / "out")
    assert lesson.title == "Week 3: fluid"
    assert [s.reference for s in lesson.scans] == [cls for _, cls in scans]
    for (image, _), scan in zip(scans, lesson.scans, strict=True):
        assert scan.image.read_bytes() == Path(image).read_bytes()
        assert scan.image.parent == tmp_path / "out"


def hostile(tmp_path: Path, manifest: object, members: dict[str, bytes]) -> Path:
    path = tmp_path / "hostile.zip"
    with zipfile.ZipFile(path, "w") as archive:
        if manifest is not None:
            text = manifest if isinstance(manifest, str) else json.dumps(manifest)
            archive.writestr("lesson.json", text)
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def good_manifest(answers: list[str]) -> dict:
    return {"format": "mirage-demo-lesson", "version": 1, "title": "t", "answers": answers}


SCAN = Path(example_scans()[0][0]).read_bytes()


@pytest.mark.parametrize(
    "manifest, members, message",
    [
        (None, {"scans/01.jpeg": SCAN}, "no lesson.json"),
        ("{not json", {"scans/01.jpeg": SCAN}, "cannot be read"),
        ("[" * 5000 + "]" * 5000, {"scans/01.jpeg": SCAN}, "cannot be read"),
        ({"format": "other"}, {"scans/01.jpeg": SCAN}, "not a lesson file made by this app"),
        (good_manifest(["CNV", "DME"]), {"scans/01.jpeg": SCAN}, "1 scans for 2 answers"),
        (good_manifest(["HACKED"]), {"scans/01.jpeg": SCAN}, "does not know \\(HACKED"),
        (good_manifest([7]), {"scans/01.jpeg": SCAN}, "answers cannot be read"),
        (good_manifest(["CNV"]), {"scans/01.jpeg": b"not an image"}, "damaged"),
        (good_manifest(["CNV"] * (MAX_LESSON_SCANS + 1)), {}, "1 to 30 scans"),
        (good_manifest(["CNV"]), {"../01.jpeg": SCAN}, "0 scans for 1 answers"),
    ],
)
def test_a_hostile_lesson_file_is_refused_and_writes_nothing_outside(
    tmp_path, manifest, members, message
):
    path = hostile(tmp_path, manifest, members)
    out = tmp_path / "deep" / "out"
    with pytest.raises(LessonError, match=message):
        read_lesson_file(path, CLASSES, out)
    written = {p for p in tmp_path.rglob("*") if p.is_file()} - {path}
    assert all(out in p.parents for p in written)


def test_a_lesson_file_is_bounded_before_it_is_read(tmp_path, monkeypatch):
    path = write_lesson_file(tmp_path / "lesson.zip", "", examples(2))
    monkeypatch.setattr(lesson_module, "MAX_LESSON_FILE_BYTES", 1000)
    with pytest.raises(LessonError, match="larger than"):
        read_lesson_file(path, CLASSES, tmp_path / "out")
    monkeypatch.undo()
    big = hostile(tmp_path, "x" * (lesson_module.MAX_MANIFEST_BYTES + 1), {})
    with pytest.raises(LessonError, match="damaged"):
        read_lesson_file(big, CLASSES, tmp_path / "out")
    (tmp_path / "notes.zip").write_text("hello")
    with pytest.raises(LessonError, match="not a lesson file"):
        read_lesson_file(tmp_path / "notes.zip", CLASSES, tmp_path / "out")


def test_a_students_answers_come_out_as_csv(tmp_path):
    items = [
        QuizItem("3f2a1b9c", "a.jpg", "DME", "DME"),
        QuizItem("=HYPERLINK(1)", "b.jpg", "CNV"),  # a lesson scan: the model asked then
        QuizItem("lesson scan 3", "c.jpg", "NORMAL"),
    ]
    quiz = Quiz.fixed(items, CLASSES, title="Week 3")
    assert [item.key for item in quiz.round] == [item.key for item in items]  # the order kept
    quiz.answer("DME", "NORMAL", "unsure")  # the item's own answer wins
    with pytest.raises(ValueError, match="model's answer"):
        quiz.answer("CNV")  # no answer of the model's: not recorded
    quiz.answer("DRUSEN", "CNV", "sure")
    path = write_answers_csv(quiz, tmp_path / "answers.csv")
    with open(path, newline="") as stream:
        rows = list(csv.reader(stream))
    assert tuple(rows[0]) == ANSWERS_HEADER
    assert rows[1] == ["1", "3f2a1b9c", "DME", "DME", "right", "DME", "right", "unsure"]
    assert rows[2] == ["2", "'=HYPERLINK(1)", "DRUSEN", "CNV", "wrong", "CNV", "right", "sure"]
    assert len(rows) == 3 and quiz.model_score == 2 and quiz.student_score == 1


def test_a_teachers_upload_becomes_a_lesson_that_students_answer(tmp_path):
    from mirage_demo.ui import ModelChoice, ModelRegistry
    from mirage_demo.ui.lesson import lesson_from_upload
    from mirage_demo.ui.quiz import answers_file, lesson_from_file, quiz_answer

    chosen = {"02.jpeg": "DRUSEN", "01.jpeg": "DME", "03.jpeg": "NORMAL"}
    upload = tmp_path / "my-scans.zip"
    with zipfile.ZipFile(upload, "w") as archive:
        for name, cls in chosen.items():
            source = next(path for path, label in example_scans() if label == cls)
            archive.write(source, f"{cls}/{name}")
        archive.writestr("notes.txt", "left out")
    path, preview, message = lesson_from_upload([str(upload)], CLASSES, "Week 3")
    assert [caption for _, caption in preview] == ["1. DME", "2. DRUSEN", "3. NORMAL"]
    assert "A lesson of 3 scans" in message
    quiz, first, score = lesson_from_file(path, CLASSES)
    assert quiz.title == "Week 3" and "Week 3" in score and Path(first).is_file()
    assert [item.reference for item in quiz.round] == ["DME", "DRUSEN", "NORMAL"]
    registry = ModelRegistry([ModelChoice("demo", str(DEMO))])
    overlay, feedback, _, anchor = quiz_answer(registry.get("demo"), quiz, "DME")
    assert "Reference: DME" in feedback and "look for" in feedback and anchor == "learn-dme"
    assert "heat map for" in overlay.info["alt_text"]
    with open(answers_file(quiz), newline="") as stream:
        rows = list(csv.reader(stream))
    assert rows[1][:5] == ["1", "lesson scan 1", "DME", "DME", "right"]
    assert rows[1][5] in CLASSES and rows[1][7] in ("sure", "unsure", "unlike the training scans")
    quiz, _, text = lesson_from_file(str(upload), CLASSES)  # not a lesson file: a sentence
    assert quiz is None and "Cannot start this lesson" in text and "no lesson.json" in text
