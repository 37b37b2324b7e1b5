"""
CI's check of the course pack (course/README.md):
  1. the solution (this repository) scores full marks;
  2. a student copy built by course/build.py imports, scores 0 on every task, and building it again from
     itself changes nothing (idempotent);
  3. in the student copy, every other test of the suite either passes or fails only because some task raises
     its NotImplementedError: the blanks break nothing else;
  4. every task's tests pass on a second correct implementation written differently from the solution
     (COURSE_ALTERNATIVE=1, implementations.ALTERNATIVES): the tests grade the property, not the solution's arithmetic.

  python course/check.py        # exit 0 when all hold; a line per failed point otherwise
"""
import importlib.util
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

from build import ROOT, build, tasks_in_readme
from grade import grade


def suite_outcomes(repo: str) -> tuple[int, list[tuple[str, str]], list[str]]:
    """Runs the repository's test suite (not the task tests) in `repo`: (tests passed, [(failed test, message)],
    [test files that could not even be collected]). A file that fails to import hides all its tests, so a
    collection error is never blamed on a task."""
    xml = os.path.join(repo, "junit.xml")
    # two workers (pytest-xdist): most of these tests stop at a blank within a second, so start-up dominates
    workers = ["-n", "2"] if importlib.util.find_spec("xdist") else []
    subprocess.run([sys.executable, "-m", "pytest", "-q", "--ignore=course", "--continue-on-collection-errors",
                    f"--junitxml={xml}", *workers], cwd=repo, capture_output=True, text=True, timeout=1800)
    passed, failed, uncollected = 0, [], []
    for case in ET.parse(xml).iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is None:
            passed += case.find("skipped") is None
        elif "collection failure" in (bad.get("message") or ""):
            uncollected.append(f"{case.get('classname') or ''}{case.get('name')}")
        else:
            failed.append((case.get("name"), (bad.get("message") or "") + (bad.text or "")))
    return passed, failed, uncollected


def main() -> int:
    problems = []
    solution = grade(ROOT, os.path.join(ROOT, "course", "test_tasks.py"))
    if solution["score"] != solution["max_score"]:
        problems.append(f"the solution scores {solution['score']} of {solution['max_score']}")
    print(f"solution: {solution['score']:g} / {solution['max_score']}")
    alternative = subprocess.run([sys.executable, "-m", "pytest", "-q", os.path.join(ROOT, "course", "test_tasks.py")],
                                 cwd=ROOT, capture_output=True, text=True, env={**os.environ, "COURSE_ALTERNATIVE": "1"})
    print(f"second implementations: {alternative.stdout.strip().splitlines()[-1]}")
    if alternative.returncode:
        problems.append("a second correct implementation fails a task's tests: " +
                        ", ".join(line.split("::")[-1] for line in alternative.stdout.splitlines() if "FAILED" in line))
    names = tasks_in_readme()
    with tempfile.TemporaryDirectory() as tmp:
        copy, again = os.path.join(tmp, "student"), os.path.join(tmp, "again")
        build(copy)
        build(again, root=copy)
        diff = subprocess.run(["diff", "-r", copy, again], capture_output=True, text=True)
        if diff.returncode:
            problems.append("building from a student copy changed it: " + diff.stdout.splitlines()[0])
        imports = subprocess.run([sys.executable, "-c", "import model, vae, yonos, data, files, metrics, upscale, "
                                  "train, sample, eval, bench"], cwd=copy, capture_output=True, text=True)
        if imports.returncode:
            problems.append("the student copy does not import: " + imports.stderr.strip().splitlines()[-1])
        student = grade(copy, os.path.join(copy, "course", "test_tasks.py"))
        scored = [t["name"] for t in student["tests"] if t["score"] > 0]
        if scored:
            problems.append(f"the student copy scores points on {', '.join(scored)}")
        print(f"student copy: {student['score']:g} / {student['max_score']}")
        passed, failed, uncollected = suite_outcomes(copy)
        blamed = lambda msg: "NotImplementedError" in msg and any(f"{n}: your code here" in msg for n in names)
        other = [name for name, msg in failed if not blamed(msg)]
        print(f"student copy, the rest of the suite: {passed} passed, {len(failed) - len(other)} failed on a "
              f"task's NotImplementedError, {len(other)} failed otherwise, {len(uncollected)} file(s) not collected")
        if other:
            problems.append(f"in the student copy these tests fail for another reason: {', '.join(other[:5])}")
        if uncollected:
            problems.append(f"in the student copy these test files cannot be collected: {', '.join(uncollected)}")
        if passed == 0:
            problems.append("in the student copy no test of the suite passes")
    for p in problems:
        print(f"course/check.py: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
