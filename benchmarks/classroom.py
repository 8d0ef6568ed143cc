"""What a lesson and a figure for slides cost: sizes and times (docs/teaching.md).

    python benchmarks/classroom.py

A lesson file of 10 and of 30 bundled test scans (a balanced draw, as the teachers' *Fill*
button makes): its size, the time to read and check it as a student's upload, and the
length of its link's code; the answer figure of a bundled example (1600x900 PNG): its size
and the median time to draw and save it, against the time to explain the scan (the
Grad-CAM call the figure is made from) measured in the same run.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mirage_demo.figures import answer_figure, save_png  # noqa: E402
from mirage_demo.inference import DEFAULT_CHECKPOINT, Predictor  # noqa: E402
from mirage_demo.lesson import lesson_code, read_lesson_file, write_lesson_file  # noqa: E402
from mirage_demo.quiz import Quiz, QuizItem  # noqa: E402
from mirage_demo.testscans import scan_set_for  # noqa: E402

EXAMPLE = ROOT / "assets" / "examples" / "DME" / "DME-11053-1.jpeg"
REPEATS = 5


def median_seconds(fn) -> float:
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    out = Path(tempfile.mkdtemp(prefix="classroom-bench-"))
    scans, why = scan_set_for(DEFAULT_CHECKPOINT)
    if scans is None:
        print(f"error: {why}", file=sys.stderr)
        return 2
    items = [QuizItem(e.file, str(e.image), e.true, e.predicted) for e in scans.entries]
    by_file = {e.file: e for e in scans.entries}
    for count in (10, 30):
        chosen = [by_file[i.key] for i in Quiz(items, count, seed=0).round]
        scans_of = [(e.image, e.true) for e in chosen]
        path = write_lesson_file(out / f"lesson-{count}.zip", "", scans_of)
        read = median_seconds(
            lambda path=path: read_lesson_file(path, scans.class_names, out / "read")
        )
        code = lesson_code([e.file for e in chosen])
        print(
            f"lesson of {count} test scans: file {path.stat().st_size / 1000:.0f} KB, read and "
            f"checked in {read:.3f} s, link code {len(code)} characters"
        )
    predictor = Predictor.from_pretrained(DEFAULT_CHECKPOINT)
    explanation = predictor.explain(str(EXAMPLE))  # warm-up (and matplotlib's first call)
    answer_figure(explanation.image, explanation.heatmap, "jet", 0.5, "", [""])
    explain = median_seconds(lambda: predictor.explain(str(EXAMPLE)))

    def figure():
        picture = answer_figure(
            explanation.image, explanation.heatmap, "jet", 0.5, "title", ["a", "b", "c"]
        )
        save_png(picture, out / "figure.png")

    drawn = median_seconds(figure)
    size = (out / "figure.png").stat().st_size / 1000
    print(
        f"answer figure: 1600x900 PNG, {size:.0f} KB, {drawn:.2f} s to draw and save "
        f"(explaining the scan: {explain:.2f} s; ratio {drawn / explain:.1f}x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
