"""The README and docs/ name only commands, options, links and files that exist (issue 16).

Every ``unimlip-*`` word must be a console script on PATH, and every ``--option`` written next to one must be in
that command's ``--help`` (its subcommand's, for commands with subcommands). An option is attributed to a command
when it follows it on a command line: a line of a fenced code block (``\\`` continuations joined; options in the
line's ``# comment`` count for the command before it) or a backticked span in prose. A backticked span that is
only options (`` `--max-size` ``) must be an option of some command the same page mentions. After ``--``,
``unimlip-submit shard`` / ``eval`` pass their arguments to ``unimlip-shard`` / ``unimlip-eval``, which are then
checked. ``python -m MODULE`` counts as the console script whose entry point is MODULE. ``bench/`` scripts are read,
not run (each imports torch before parsing): their ``add_argument("--x"`` calls, a shell script's ``case`` arms.
Commands are found by their console-script names on PATH (the venv's bin is first, see conftest.py), never by
module path, so moving a module does not break this test.
"""
import importlib.metadata
import re
import shutil
import subprocess
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

COMMAND_RE = re.compile(r"(?<![\w<-])unimlip-[a-z]+(?:-[a-z]+)*")
OPTION_RE = re.compile(r"^[\[(\"']*(--[A-Za-z][\w-]*)")
BENCH_RE = re.compile(r"^(?:\./)?(bench/[\w-]+\.(?:py|sh))$")
# After `--`, these subcommands hand the rest of the line to another console script.
NESTED = {("unimlip-submit", "shard"): "unimlip-shard", ("unimlip-submit", "eval"): "unimlip-eval"}
# Options of other tools that the docs name in a backticked span of their own, and whose tool they are.
FOREIGN = {"--accum-freq": "open_clip's training script", "--shutdown-timeout": "torchrun", "--requeue": "sbatch",
           "--ntasks-per-node": "sbatch and srun"}
# Paths the docs name that are git-ignored outputs, absent from a fresh clone.
IGNORED = ("bench/gpu_wheels",)


@dataclass
class Use:
    """One command written in a doc: where, which (sub)command, and the options written after it."""

    doc: str
    line: int
    command: str  # a console script name or bench/NAME.py|sh
    tokens: list = field(default_factory=list)  # the words written after the command


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def _fenced_and_prose(text: str) -> tuple:
    """(logical lines of fenced blocks as (lineno, code, comment), prose with fenced blocks blanked out)."""
    lines, prose, fenced = text.split("\n"), [], []
    inside, pending, start = False, "", 0
    for n, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            inside = not inside
            prose.append("")
            continue
        if not inside:
            prose.append(line)
            continue
        prose.append("")
        if not pending:
            start = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical, pending = pending + line, ""
        code, _, comment = logical.partition(" #") if not logical.lstrip().startswith("#") else ("", "", logical)
        fenced.append((start, code, comment))
    return fenced, "\n".join(prose)


def _console_modules() -> dict:
    """module -> console-script name, from this install's entry points (so `-m MODULE` resolves after a move)."""
    eps = importlib.metadata.entry_points(group="console_scripts")
    return {ep.value.split(":")[0]: ep.name for ep in eps if ep.name.startswith("unimlip-")}


def _segments(doc: str, line: int, code: str, modules: dict) -> list:
    """The commands of one command line, each with the tokens that follow it up to the next command."""
    uses, current = [], None
    tokens = re.split(r"\s+", code.strip())
    i = 0
    while i < len(tokens):
        tok = tokens[i].strip("`")
        name = None
        m = COMMAND_RE.search(tok)
        if m and (tok == m.group(0) or tok.endswith("/" + m.group(0))):
            name = m.group(0)
        elif tok == "-m" and i + 1 < len(tokens) and tokens[i + 1] in modules:
            name, i = modules[tokens[i + 1]], i + 1
        elif BENCH_RE.match(tok):
            name = BENCH_RE.match(tok).group(1)
        elif tok in ("&&", "||", ";", "|"):
            current = None
        if name:
            current = Use(doc, line, name)
            uses.append(current)
        elif current is not None:
            current.tokens.append(tok)
        i += 1
    return uses


def _mentions() -> tuple:
    """(command uses, bare option spans as (doc, line, [options]), every unimlip-* word as (doc, line, word))."""
    modules = _console_modules()
    uses, bare, words = [], [], []
    for path in DOCS:
        doc, text = _rel(path), path.read_text(encoding="utf-8")
        for n, line in enumerate(text.split("\n"), 1):
            words += [(doc, n, w) for w in COMMAND_RE.findall(line)]
        fenced, prose = _fenced_and_prose(text)
        for n, code, comment in fenced:
            found = _segments(doc, n, code, modules)
            if found:
                found[-1].tokens += [t for t in comment.split() if OPTION_RE.match(t)]
            uses += found
        for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", prose):
            n = prose.count("\n", 0, m.start()) + 1
            span = " ".join(m.group(1).split())
            found = _segments(doc, n, span, modules)
            uses += found
            if not found and span.startswith("--"):
                bare.append((doc, n, [o.group(1) for t in span.split() if (o := OPTION_RE.match(t))]))
    return uses, bare, words


def _run_help(argv: list) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()[-400:]}")
    return proc.stdout


def _help_argv(command: str, sub: str | None) -> list | None:
    exe = shutil.which(command)
    return [exe, *([sub] if sub else []), "--help"] if exe else None


def _options_of(command: str, help_text: str) -> set:
    """The options argparse lists (one per line, indented two spaces); a bench script's, read from its source."""
    if command.endswith(".sh"):
        return set(re.findall(r"(--[\w-]+)(?=[|)])", (REPO / command).read_text()))  # its `case` arms
    if command.startswith("bench/"):
        calls = re.findall(r"add_argument\(\s*((?:[\"'][\w-]+[\"']\s*,\s*)+)", (REPO / command).read_text())
        return set(re.findall(r"--[\w-]+", " ".join(calls)))
    found = set()
    for line in help_text.splitlines():
        m = re.match(r"  (-\S.*?)(?:\s{2,}|$)", line)
        if m:
            found |= set(re.findall(r"--[\w-]+", m.group(1)))
    return found


def _subcommands(help_text: str) -> set:
    head = help_text.split("\n\n")[0]
    if not re.search(r"(\}|\bCOMMAND) \.\.\.", head):
        return set()
    return set(re.findall(r"^    ([a-z][a-z0-9-]*)(?:\s{2,}\S.*)?$", help_text, re.M))


class Helps:
    """Each command's --help and, for a command with subcommands, each subcommand's: run once, in parallel."""

    def __init__(self):
        self.text, self.errors = {}, {}

    @staticmethod
    def _one(key) -> tuple:
        command, sub = key
        if command.startswith("bench/"):
            return key, "", None  # read from the script itself (see _options_of)
        argv = _help_argv(command, sub)
        if argv is None:
            return key, None, f"{command} is not on PATH"
        try:
            return key, _run_help(argv), None
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            return key, None, str(exc)

    def fetch(self, keys) -> None:
        """The helps of ``keys`` ((command, None) pairs), then of each one's subcommands as soon as it is known."""
        with ThreadPoolExecutor(max_workers=4) as pool:
            pending = {pool.submit(self._one, k) for k in set(keys) if k not in self.text and k not in self.errors}
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    key, text, error = future.result()
                    if error:
                        self.errors[key] = error
                        continue
                    self.text[key] = text
                    if key[1] is None:
                        pending |= {pool.submit(self._one, (key[0], s)) for s in _subcommands(text)}

    def options(self, command: str, sub: str | None) -> set:
        return _options_of(command, self.text.get((command, sub), ""))

    def all_options(self, command: str) -> set:
        """The options of a command and of every one of its subcommands."""
        return self.options(command, None).union(*(self.options(command, s) for s in self.subs(command)))

    def subs(self, command: str) -> set:
        return _subcommands(self.text.get((command, None), ""))


def _resolve(use: Use, helps: Helps) -> list:
    """Split a use's tokens into (command, sub, option) checks, following `--` into a nested command."""
    checks, command, sub, subs = [], use.command, None, helps.subs(use.command)
    expect_sub = bool(subs)
    for tok in use.tokens:
        if tok == "--":
            nested = NESTED.get((command, sub))
            if nested is None:
                break
            command, sub, subs = nested, None, helps.subs(nested)
            expect_sub = bool(subs)
            continue
        opt = OPTION_RE.match(tok)
        if opt:
            checks.append((command, sub, opt.group(1)))
            continue
        if expect_sub:
            expect_sub = False
            word = tok.strip("`[]()'\",")
            if word in subs:
                sub = word
            elif re.fullmatch(r"[a-z][a-z0-9-]*", word):
                checks.append((command, word, None))  # a subcommand that does not exist
    if not checks:
        checks.append((command, sub, None))
    return checks


@pytest.fixture(scope="module")
def mentions():
    return _mentions()


@pytest.fixture(scope="module")
def helps(mentions):
    uses, _, _ = mentions
    h = Helps()
    h.fetch([(u.command, None) for u in uses] + [(n, None) for n in NESTED.values()])
    return h


def test_docs_exist():
    assert (REPO / "docs").is_dir() and len(DOCS) >= 5, "README.md plus at least 4 pages under docs/"
    assert sum(1 for _ in (REPO / "README.md").open(encoding="utf-8")) <= 300, "README.md over 300 lines"


def test_every_command_exists(mentions):
    _, _, words = mentions
    missing = [f"{doc}:{n}: {w} is not a console script on PATH" for doc, n, w in words if not shutil.which(w)]
    assert not missing, "\n".join(missing)


def test_every_option_exists(mentions, helps):
    uses, bare, _ = mentions
    problems = []
    for use in uses:
        for command, sub, opt in _resolve(use, helps):
            name = f"{command} {sub}" if sub else command
            key = (command, sub)
            if sub and sub not in helps.subs(command):
                problems.append(f"{use.doc}:{use.line}: `{command}` has no subcommand {sub!r}")
            elif key in helps.errors:
                problems.append(f"{use.doc}:{use.line}: {name} --help failed: {helps.errors[key]}")
            elif opt and opt not in (helps.options(command, sub) if sub else helps.all_options(command)):
                problems.append(f"{use.doc}:{use.line}: `{name}` has no option {opt} (see `{name} --help`)")
    by_doc = {}
    for use in uses:
        for command in {use.command} | {NESTED[k] for k in NESTED if k[0] == use.command}:
            by_doc.setdefault(use.doc, set()).add(command)
    for doc, n, options in bare:
        commands = sorted(by_doc.get(doc, ()))
        known = set(FOREIGN).union(*(helps.all_options(c) for c in commands))
        for opt in options:
            if opt not in known:
                problems.append(
                    f"{doc}:{n}: {opt} is not an option of any command this page mentions ({', '.join(commands)})"
                )
    assert not problems, "\n".join(problems)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_links_resolve():
    problems = []
    for path in DOCS:
        _, prose = _fenced_and_prose(path.read_text(encoding="utf-8"))
        for m in re.finditer(r"\]\(([^)\s]+)\)", prose):
            target = m.group(1)
            if re.match(r"[a-z]+:", target):
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            n = prose.count("\n", 0, m.start()) + 1
            if not dest.exists():
                problems.append(f"{_rel(path)}:{n}: link to {target}: {file_part} does not exist")
            elif anchor and dest.suffix == ".md":
                heads = re.findall(r"^#+\s+(.*)$", _fenced_and_prose(dest.read_text(encoding="utf-8"))[1], re.M)
                if anchor not in {_slug(h) for h in heads}:
                    problems.append(f"{_rel(path)}:{n}: link to {target}: no heading #{anchor} in {file_part}")
    assert not problems, "\n".join(problems)


def test_named_files_exist():
    """Every repository path (and `-m` module) the docs name exists. Until issue 16's layout has landed
    (unimlip_train/format/ present), paths of that layout may be missing: the test then skips, listing them."""
    pattern = re.compile(r"(?<![\w./-])((?:unimlip_train|data_prep|launch|bench|configs|tests|docs|\.ci)/[\w./*-]*)")
    missing = set()
    for path in DOCS:
        for m in pattern.finditer(path.read_text(encoding="utf-8")):
            name = m.group(1).rstrip(".")
            if name.startswith(IGNORED):
                continue
            if not list(REPO.glob(name.rstrip("/"))):
                missing.add(f"{_rel(path)}: {name}")
        for m in re.finditer(r"-m ((?:unimlip_train|data_prep|launch)(?:\.\w+)+)", path.read_text(encoding="utf-8")):
            mod = REPO / m.group(1).replace(".", "/")
            if not (mod.with_suffix(".py").exists() or (mod / "__init__.py").exists()):
                missing.add(f"{_rel(path)}: -m {m.group(1)}")
    if missing and not (REPO / "unimlip_train" / "format").is_dir():
        pytest.skip("issue 16's layout has not landed; missing: " + "; ".join(sorted(missing)))
    assert not missing, "\n".join(sorted(missing))
