"""
Writes the student copy of the repository: every region of the code between a line `# BEGIN SOLUTION <task>`
and a line `# END SOLUTION` (the instructor's solution) is replaced by `raise NotImplementedError("<task>: ...")`
at the same indentation, padded with blank lines so every line keeps its number; the markers stay, so building
again from a student copy gives the same copy (idempotent), and every other byte is unchanged. The conventions
are nbgrader's/otter-grader's; the tasks are described in course/README.md and graded by course/grade.py.

  python course/build.py OUT          # OUT must be empty or absent
  python course/build.py OUT --force  # replace an earlier build in OUT

Unbalanced or nested markers, or a task name not in course/README.md, are a one-line error.
"""
import argparse
import os
import re
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SKIP = {".git", ".venv", "runs", "out", "photos", "__pycache__", ".pytest_cache"}  # never copied
BEGIN = re.compile(r"^(\s*)# BEGIN SOLUTION ([a-z_]+)\s*$")
END = re.compile(r"^(\s*)# END SOLUTION\s*$")


def tasks_in_readme() -> list[str]:
    """The task names, in order, from the '## Task N: `name`' headings of course/README.md."""
    text = open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    return re.findall(r"^## Task \d+: `([a-z_]+)`", text, flags=re.M)


def blank_out(text: str, path: str, known: set[str]) -> tuple[str, list[str]]:
    """The student version of one file's text and the tasks found in it. Raises ValueError on bad markers."""
    out, tasks, open_task = [], [], None
    for n, line in enumerate(text.split("\n"), 1):
        begin, end = BEGIN.match(line), END.match(line)
        if begin:
            if open_task:
                raise ValueError(f"{path}:{n}: BEGIN SOLUTION {begin[2]} inside the region of task {open_task[1]} "
                                 f"(line {open_task[2]}); regions cannot nest")
            if begin[2] not in known:
                raise ValueError(f"{path}:{n}: task {begin[2]!r} is not a task of course/README.md")
            open_task = (begin[1], begin[2], n)
            tasks.append(begin[2])
            out += [line, f'{begin[1]}raise NotImplementedError("{begin[2]}: your code here (course/README.md, '
                          f'task {begin[2]})")']
        elif end:
            if not open_task:
                raise ValueError(f"{path}:{n}: END SOLUTION without a BEGIN SOLUTION")
            # blank lines in place of the rest of the solution: every line after it keeps its number, so the
            # README's file:line table and tracebacks point to the same places in both copies
            out += [""] * max(0, n - open_task[2] - 2)
            open_task = None
            out.append(line)
        elif not open_task:
            out.append(line)
    if open_task:
        raise ValueError(f"{path}:{open_task[2]}: BEGIN SOLUTION {open_task[1]} is never ended")
    return "\n".join(out), tasks


def build(out: str, root: str = ROOT, force: bool = False) -> dict[str, list[str]]:
    """Copies `root` to `out` with every marked region blanked; returns {file: tasks found}. Every file is
    checked before anything is written."""
    known, found, texts = set(tasks_in_readme()), {}, {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP and not d.startswith("."))
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith(".py"):
                text, tasks = blank_out(open(path, encoding="utf-8").read(), os.path.relpath(path, root), known)
                texts[path] = text
                if tasks:
                    found[os.path.relpath(path, root)] = tasks
    if os.path.abspath(out).startswith(os.path.abspath(root) + os.sep):
        raise ValueError(f"{out}: inside the repository; choose a folder outside it")
    if os.path.exists(out) and os.listdir(out) and not force:
        raise ValueError(f"{out}: not empty (pass --force to replace an earlier build)")
    if os.path.exists(out):
        shutil.rmtree(out)
    shutil.copytree(root, out, ignore=lambda folder, names: [n for n in names if n in SKIP or
                                                             (n.startswith(".") and n not in (".ci", ".gitignore"))])
    for path, text in texts.items():
        with open(os.path.join(out, os.path.relpath(path, root)), "w", encoding="utf-8") as f:
            f.write(text)
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="course/build.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="folder for the student copy")
    p.add_argument("--force", action="store_true", help="replace an earlier build in OUT")
    args = p.parse_args(argv)
    try:
        found = build(args.out, force=args.force)
    except (ValueError, OSError) as e:
        print(f"course/build.py: error: {e}", file=sys.stderr)
        return 2
    tasks = sorted({t for ts in found.values() for t in ts})
    print(f"wrote {args.out}: {sum(map(len, found.values()))} regions of {len(tasks)} tasks blanked in "
          f"{', '.join(sorted(found))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
