"""
Grades the course tasks of a repository: runs each task's tests (course/test_tasks.py, one pytest marker per
task), prints a table task / points / passed, and writes results.json in Gradescope's format. Partial credit:
a task's points times the share of its tests that pass. Exit code 0 even when tasks fail (a grade, not a check).

  python course/grade.py                 # this repository (the solution: full marks)
  python course/grade.py STUDENT_COPY    # a copy made by course/build.py, or a student's submission
  python course/grade.py REPO --tests course/test_tasks.py --out results.json

The tests run from --tests (default: REPO's own course/test_tasks.py); for graded submissions pass the
instructor's copy, so nobody grades themselves with edited tests.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository's own modules
from files import write_atomic  # noqa: E402  (after the path is set)


def tasks(readme: str = os.path.join(HERE, "README.md")) -> list[tuple[str, int]]:
    """(name, points) of every task, in order, from the '## Task N: `name` (P points)' headings."""
    text = open(readme, encoding="utf-8").read()
    return [(name, int(points)) for name, points in re.findall(r"^## Task \d+: `([a-z_]+)` \((\d+) points\)", text,
                                                                flags=re.M)]


def run_task(repo: str, tests: str, task: str) -> list[dict]:
    """Runs one task's tests in `repo` (its code first on the path); returns [{name, passed, message}]."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "junit.xml")
        env = dict(os.environ, PYTHONPATH=os.path.abspath(repo))
        subprocess.run([sys.executable, "-m", "pytest", os.path.abspath(tests), "-m", task, "-q", "-p",
                        "no:cacheprovider", f"--junitxml={xml}", "--rootdir", os.path.abspath(repo)],
                       cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        if not os.path.isfile(xml):
            return [{"name": f"{task} (the tests could not run)", "passed": False, "message": "no report"}]
        results = []
        for case in ET.parse(xml).iter("testcase"):
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            results.append({"name": case.get("name"), "passed": bad is None and case.find("skipped") is None,
                            "message": (bad.get("message") or "")[:500] if bad is not None else ""})
        return results


def grade(repo: str, tests: str) -> dict:
    report = {"tests": [], "score": 0.0, "max_score": 0, "execution_time": 0.0}
    t0 = time.time()
    for n, (task, points) in enumerate(tasks(), 1):
        results = run_task(repo, tests, task)
        passed = sum(r["passed"] for r in results)
        score = points * passed / max(len(results), 1)
        output = "\n".join(f"{'PASS' if r['passed'] else 'FAIL'} {r['name']}" + (f": {r['message']}" if r["message"]
                                                                                else "") for r in results)
        report["tests"].append({"name": f"Task {n}: {task} ({passed}/{len(results)} tests)", "score": round(score, 2),
                                "max_score": points, "output": output})
        report["score"] += score
        report["max_score"] += points
    report["score"] = round(report["score"], 2)
    report["execution_time"] = round(time.time() - t0, 1)
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="course/grade.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("repo", nargs="?", default=os.path.dirname(HERE), help="the repository to grade (default: this one)")
    p.add_argument("--tests", default="", help="the task tests to run (default: REPO/course/test_tasks.py)")
    p.add_argument("--out", default="results.json", help="where to write the Gradescope results (default: results.json)")
    args = p.parse_args(argv)
    tests = args.tests or os.path.join(args.repo, "course", "test_tasks.py")
    if not os.path.isfile(tests):
        print(f"course/grade.py: error: {tests}: no such test file", file=sys.stderr)
        return 2
    report = grade(args.repo, tests)
    print("| task | points | tests passed |\n|---|---|---|")
    for t in report["tests"]:
        name, passed = t["name"].rsplit(" (", 1)
        print(f"| {name} | {t['score']:g} / {t['max_score']} | {passed.removesuffix(' tests)')} |")
    print(f"| **total** | **{report['score']:g} / {report['max_score']}** | ({report['execution_time']} s) |")
    write_atomic(args.out, json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
