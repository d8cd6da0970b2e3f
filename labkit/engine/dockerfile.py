"""Reading a Dockerfile (Containerfile): lines -> instructions -> stages.

The Dockerfile reference (docs.docker.com/reference/dockerfile) in the parts labkit
builds:

- one instruction per line, its keyword in any case (the lecture's slide writes ``add``);
  a line ending in ``\\`` continues on the next; a line whose first character is ``#``
  is a comment, also between continued lines;
- *shell form* ``RUN cmd args`` runs ``/bin/sh -c 'cmd args'``; *exec form*
  ``RUN ["cmd", "args"]`` (a JSON array) runs the program itself;
- flags come first: ``COPY --from=build --chown=1000:1000 src dest``;
- ``$VAR``, ``${VAR}``, ``${VAR:-default}`` and ``${VAR:+alt}`` are replaced in FROM,
  COPY, ADD, ENV, ARG, WORKDIR, USER, EXPOSE, LABEL and STOPSIGNAL (not in RUN, CMD or
  ENTRYPOINT: the shell in the container does that), except inside single quotes;
- ``FROM base [AS name]`` starts a stage; ARGs before the first FROM are for FROM lines.

``.dockerignore`` patterns (``ignored``) are Go ``filepath.Match`` patterns plus ``**``
(any number of directories) and ``!`` (an exception); the last pattern that matches a
path, or one of its parent directories, decides.

    >>> [i.keyword for i in parse("from busybox\\nadd a.txt /a\\n")]
    ['FROM', 'ADD']
    >>> expand("$HOME/conf ${X:-none}", {"HOME": "/root"})
    '/root/conf none'

Layer: engine. Used by build; imports nothing of labkit but errors.
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass

from labkit.errors import InvalidValue

KEYWORDS = ("FROM", "RUN", "CMD", "LABEL", "MAINTAINER", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT",
            "USER", "WORKDIR", "ARG", "STOPSIGNAL")  # fmt: skip
EXPANDED = {"FROM", "COPY", "ADD", "ENV", "ARG", "WORKDIR", "USER", "EXPOSE", "LABEL", "STOPSIGNAL"}
FLAGS = {"FROM": ("platform",), "COPY": ("from", "chown", "chmod"), "ADD": ("chown", "chmod")}


@dataclass(frozen=True)
class Instruction:
    """One instruction: its first line number, keyword (upper case), flags and the rest of
    the line (``args``); ``exec_form`` is the JSON array when the line used one."""

    line: int
    keyword: str
    args: str
    flags: tuple[tuple[str, str], ...] = ()
    exec_form: tuple[str, ...] | None = None

    @property
    def text(self) -> str:
        """The instruction as ``docker build`` prints it on its ``Step N/M :`` line."""
        flags = "".join(f"--{k}={v} " for k, v in self.flags)
        return f"{self.keyword} {flags}{self.args}".rstrip()

    def flag(self, name: str) -> str | None:
        return dict(self.flags).get(name)

    def error(self, accepted: str) -> InvalidValue:
        return InvalidValue(f"Dockerfile line {self.line}", self.text, accepted)


@dataclass(frozen=True)
class Stage:
    """``FROM base [AS name]`` and the instructions up to the next FROM."""

    index: int
    base: str
    name: str
    frm: Instruction
    instructions: tuple[Instruction, ...]


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, text) of each instruction, continuations joined."""
    out: list[tuple[int, str]] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue  # a comment, or a blank line, even inside a continuation
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append((start, (pending + line).strip()))
        pending = ""
    if pending.strip():
        out.append((start, pending.strip()))
    return out


def parse(text: str) -> list[Instruction]:
    """The instructions of a Dockerfile; ``InvalidValue`` naming the line for a keyword
    labkit does not know or a flag the instruction does not take."""
    found = []
    for number, line in _logical_lines(text):
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword not in KEYWORDS:
            raise InvalidValue(f"Dockerfile line {number}", line, "an instruction: " + ", ".join(KEYWORDS))
        flags = []
        while rest.startswith("--"):
            word, _, rest = rest.partition(" ")
            name, eq, value = word[2:].partition("=")
            if name not in FLAGS.get(keyword, ()) or not eq:
                allowed = ", ".join(f"--{f}=VALUE" for f in FLAGS.get(keyword, ())) or "no flags"
                raise InvalidValue(f"Dockerfile line {number}", line, f"{keyword} with {allowed}")
            flags.append((name, value))
            rest = rest.strip()
        exec_form = None
        if keyword in ("RUN", "CMD", "ENTRYPOINT") and rest.startswith("["):
            try:
                parsed = json.loads(rest)
            except ValueError:
                parsed = None  # not JSON: the shell form of a command that starts with '['
            if isinstance(parsed, list) and all(isinstance(a, str) for a in parsed):
                exec_form = tuple(parsed)
        found.append(Instruction(number, keyword, rest, tuple(flags), exec_form))
    return found


def stages(instructions: list[Instruction]) -> tuple[list[Instruction], list[Stage]]:
    """The ARGs before the first FROM, and the stages."""
    meta: list[Instruction] = []
    out: list[Stage] = []
    current: list[Instruction] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            if out:
                out[-1] = _with(out[-1], current)
            words = ins.args.split()
            if len(words) not in (1, 3) or (len(words) == 3 and words[1].upper() != "AS"):
                raise ins.error("FROM IMAGE[:TAG] [AS NAME], or FROM scratch")
            out.append(Stage(len(out), words[0], words[2].lower() if len(words) == 3 else "", ins, ()))
            current = []
        elif not out:
            if ins.keyword != "ARG":
                raise ins.error("FROM first (only ARG may come before it)")
            meta.append(ins)
        else:
            current.append(ins)
    if not out:
        raise InvalidValue("Dockerfile", "(no FROM)", "at least one FROM line, e.g. FROM busybox")
    out[-1] = _with(out[-1], current)
    return meta, out


def _with(stage: Stage, instructions: list[Instruction]) -> Stage:
    return Stage(stage.index, stage.base, stage.name, stage.frm, tuple(instructions))


# --- words and variables -----------------------------------------------------------

_VAR = re.compile(r"\$(?:\{(\w+)(?::([-+])([^}]*))?\}|(\w+))")


def expand(text: str, env: dict[str, str]) -> str:
    """Replace variables outside single quotes (quotes themselves are kept)."""
    return "".join(_expand_words(text, env, keep_quotes=True))


def words(text: str, env: dict[str, str] | None = None) -> list[str]:
    """Split ``text`` as the shell would (quotes removed, ``\\`` escapes), expanding
    variables when ``env`` is given: ``ENV A="x y" B=$A`` -> ['A=x y', 'B=x y']."""
    return _expand_words(text, env, keep_quotes=False)


def _expand_words(text: str, env: dict[str, str] | None, keep_quotes: bool) -> list[str]:
    out: list[str] = []
    word: list[str] = []
    quote = ""
    started = False
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\" and quote != "'" and i + 1 < len(text):
            word.append(text[i : i + 2] if keep_quotes else text[i + 1])
            i += 2
            started = True
            continue
        if c in "'\"" and quote in ("", c):
            quote = "" if quote else c
            started = True
            if keep_quotes:
                word.append(c)
            i += 1
            continue
        if c == "$" and quote != "'" and env is not None:
            m = _VAR.match(text, i)
            if m:
                name = m.group(1) or m.group(4)
                value = env.get(name, "")
                if m.group(2) == "-":
                    value = value or m.group(3)
                elif m.group(2) == "+":
                    value = m.group(3) if value else ""
                word.append(value)
                started = True
                i = m.end()
                continue
        if c.isspace() and not quote and not keep_quotes:
            if started:
                out.append("".join(word))
            word, started = [], False
            i += 1
            continue
        word.append(c)
        started = True
        i += 1
    if quote and not keep_quotes:
        raise InvalidValue("quoting", text, "matching quotes")
    if started or keep_quotes:
        out.append("".join(word))
    return out


def key_values(ins: Instruction, env: dict[str, str]) -> list[tuple[str, str]]:
    """ENV, LABEL and ARG pairs: ``K=V K2="v 2"``, or ENV's old form ``ENV K the value``."""
    items = words(ins.args, env)
    if ins.keyword in ("ENV", "LABEL") and items and "=" not in items[0]:
        if len(items) < 2:
            raise ins.error(f"{ins.keyword} KEY=VALUE ... (or {ins.keyword} KEY VALUE)")
        return [(items[0], " ".join(items[1:]))]
    pairs = []
    for item in items:
        key, eq, value = item.partition("=")
        if not key or (not eq and ins.keyword != "ARG"):
            raise ins.error(f"{ins.keyword} KEY=VALUE ...")
        pairs.append((key, value if eq else None))
    if not pairs:
        raise ins.error(f"{ins.keyword} KEY=VALUE ...")
    return pairs  # type: ignore[return-value]


# --- .dockerignore and COPY's globs ---------------------------------------------------


def _regex(pattern: str, double_star: bool) -> str:
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if double_star and pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                out.append("(?:.*/)?")
                i += 1
            else:
                out.append(".*")
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pattern.find("]", i + 2)
            if end < 0:
                raise InvalidValue("pattern", pattern, "a Go filepath.Match pattern with closed [ ]")
            body = pattern[i + 1 : end]
            out.append("[" + ("^" + body[1:] if body.startswith("^") else re.escape(body).replace("\\-", "-")) + "]")
            i = end
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def glob_match(pattern: str, path: str) -> bool:
    """Go's ``filepath.Match``: ``*`` and ``?`` never match a ``/``."""
    return re.fullmatch(_regex(pattern, double_star=False), path) is not None


def ignore_rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    """The patterns of a .dockerignore: (is an exception, compiled pattern)."""
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = posixpath.normpath(line[1:].strip() if negate else line).lstrip("/")
        if pattern in ("", "."):
            continue
        rules.append((negate, re.compile(_regex(pattern, double_star=True))))
    return rules


def ignored(rules: list[tuple[bool, re.Pattern[str]]], path: str) -> bool:
    """Whether ``path`` (relative, with ``/``) is left out of the context."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for negate, rx in rules:
        if any(rx.fullmatch(c) for c in candidates):
            result = not negate
    return result
