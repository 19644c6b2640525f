"""Man pages and shell completion, generated from the programs' own argument parsers.

``python -m hmmirror.tools.docgen man DIR`` writes ``hmmd.8``, ``hm-agent.8`` and
``hmmctl.1`` into ``DIR``; ``python -m hmmirror.tools.docgen completion bash`` prints
a bash completion script for all three. Both read the parsers the programs use, so
they cannot drift from ``--help``; the repository keeps the generated pages in
``docs/man/`` and a test regenerates them to prove they are current.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from hmmirror.daemon import version


@dataclass(frozen=True)
class Program:
    """One program: its parser, its man section and what the page says about it."""

    name: str
    section: int
    summary: str
    parser: Callable[[], argparse.ArgumentParser]


def _hmmd() -> argparse.ArgumentParser:
    from hmmirror.daemon.__main__ import _parser

    return _parser()


def _hmmctl() -> argparse.ArgumentParser:
    # ctlparse, not ctlapp: ``hmmctl completion`` (ctlapp's) calls bash_completion here.
    from hmmirror.tools.ctlparse import build

    return build()


def _hm_agent() -> argparse.ArgumentParser:
    from hmmirror.tools.agentapp import _parser

    return _parser()


PROGRAMS = (
    Program("hmmd", 8, "the hmmirror host daemon", _hmmd),
    Program("hm-agent", 8, "an mlx5-model RDMA agent for hmmirror", _hm_agent),
    Program("hmmctl", 1, "inspect hmmd and hm-agent, run the demo and the checker", _hmmctl),
)

#: What each program's EXIT STATUS section says (README's exit codes).
EXIT_STATUS = (
    ("0", "success"),
    ("1", "a failure at run time (for hmmctl check and demo: a coherence violation)"),
    ("2", "a usage or configuration error, or an endpoint that cannot be bound"),
)


def _roff(text: str) -> str:
    """``text`` safe in roff: backslashes doubled, leading dots and quotes escaped."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(
        "\\&" + line if line.startswith((".", "'")) else line for line in text.splitlines()
    )


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The parser's subcommands, by name, in definition order (aliases left out)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen: dict[int, str] = {}
            for name, sub in action.choices.items():
                seen.setdefault(id(sub), name)
            return {name: action.choices[name] for name in seen.values()}
    return {}


def _sub_help(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each subcommand's one-line help."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {a.dest: a.help or "" for a in action._choices_actions}
    return {}


def _options(parser: argparse.ArgumentParser) -> Iterator[tuple[str, str]]:
    """(flags with metavar, help) of each option and positional, ``--help`` left out."""
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if action.help == argparse.SUPPRESS:
            continue
        if action.option_strings:
            flags = ", ".join(action.option_strings)
            if action.nargs != 0:
                metavar = action.metavar or action.dest.upper()
                flags += f" {metavar}"
        else:
            flags = str(action.metavar or action.dest)
        text = (action.help or "") % {"default": action.default, "prog": parser.prog}
        yield flags, text


def _entries(parser: argparse.ArgumentParser) -> list[str]:
    """``.TP`` entries for the options and positionals of ``parser``."""
    out = []
    for flags, text in _options(parser):
        out += [".TP", f"\\fB{_roff(flags)}\\fR", _roff(text)]
    return out


def _command(title: str, text: str, parser: argparse.ArgumentParser) -> list[str]:
    """A COMMANDS subsection: heading, what it does, its options, then its own subcommands."""
    out = [f".SS {_roff(title)}", ".PP", _roff(text), *_entries(parser)]
    helps = _sub_help(parser)
    for name, sub in _subcommands(parser).items():
        out += _command(f"{title} {name}", helps.get(name, ""), sub)
    return out


def manpage(program: Program, date: datetime.date | None = None) -> str:
    """The roff man page of ``program``."""
    parser = program.parser()
    day = (date or datetime.date(2026, 1, 1)).isoformat()
    lines = [
        f'.TH {program.name.upper()} {program.section} "{day}" "hmmirror {version()}" "hmmirror"',
        ".SH NAME",
        f"{_roff(program.name)} \\- {_roff(program.summary)}",
        ".SH SYNOPSIS",
        f"\\fB{_roff(program.name)}\\fR [\\fIOPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]"
        if _subcommands(parser)
        else f"\\fB{_roff(program.name)}\\fR [\\fIOPTIONS\\fR]",
        ".SH DESCRIPTION",
        _roff(parser.description or program.summary),
        ".SH OPTIONS",
    ]
    lines += _entries(parser)
    helps = _sub_help(parser)
    commands = _subcommands(parser)
    if commands:
        lines.append(".SH COMMANDS")
        for name, sub in commands.items():
            lines += _command(name, helps.get(name, ""), sub)
    if parser.epilog:
        lines += [".SH ENVIRONMENT AND FILES", _roff(parser.epilog)]
    lines.append(".SH EXIT STATUS")
    for code, meaning in EXIT_STATUS:
        lines += [".TP", f"\\fB{code}\\fR", _roff(meaning)]
    others = [f"\\fB{p.name}\\fR({p.section})" for p in PROGRAMS if p.name != program.name]
    lines += [".SH SEE ALSO", ", ".join(others)]
    return "\n".join(lines) + "\n"


def _valued(parser: argparse.ArgumentParser) -> list[str]:
    """The option strings of ``parser`` that take a value (the next word)."""
    return [
        s for a in parser._actions if a.option_strings and a.nargs != 0 for s in a.option_strings
    ]


def _words(parser: argparse.ArgumentParser) -> list[str]:
    """Every option string of ``parser``."""
    return [s for a in parser._actions for s in a.option_strings]


def bash_completion() -> str:
    """A bash script completing subcommands and options of all three programs."""
    out = ["# bash completion for hmmd, hm-agent and hmmctl (hmmirror.tools.docgen)."]
    for program in PROGRAMS:
        parser = program.parser()
        fn = "_hmmirror_" + program.name.replace("-", "_")
        commands = _subcommands(parser)
        out.append(f"{fn}() {{")
        out.append('    local cur="${COMP_WORDS[COMP_CWORD]}" cmd="" i')
        valued = "|".join(_valued(parser)) or "--"
        out.append("    for ((i = 1; i < COMP_CWORD; i++)); do")
        out.append('        case "${COMP_WORDS[i]}" in')
        out.append(f"            {valued}) ((i++)) ;;  # the option's value is not the command")
        out.append("            -*) ;;")
        out.append('            *) cmd="${COMP_WORDS[i]}"; break ;;')
        out.append("        esac")
        out.append("    done")
        out.append('    local words=""')
        out.append('    case "$cmd" in')
        for name, sub in commands.items():
            inner = list(_subcommands(sub)) + _words(sub)
            out.append(f'        {name}) words="{" ".join(inner)}" ;;')
        top = list(commands) + _words(parser)
        out.append(f'        *) words="{" ".join(top)}" ;;')
        out.append("    esac")
        out.append('    COMPREPLY=($(compgen -W "$words" -- "$cur"))')
        out.append("}")
        out.append(f"complete -o default -F {fn} {program.name}")
    return "\n".join(out) + "\n"


def write_manpages(directory: str) -> list[str]:
    """Write every program's page into ``directory``; return the paths."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for program in PROGRAMS:
        path = os.path.join(directory, f"{program.name}.{program.section}")
        with open(path, "w") as f:
            f.write(manpage(program))
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    """``man DIR`` or ``completion bash``."""
    parser = argparse.ArgumentParser(
        prog="python -m hmmirror.tools.docgen",
        description="Generate man pages or shell completion from hmmirror's parsers.",
    )
    sub = parser.add_subparsers(dest="what", metavar="WHAT", required=True)
    man = sub.add_parser("man", help="write hmmd.8, hm-agent.8 and hmmctl.1 into DIR")
    man.add_argument("directory", metavar="DIR")
    completion = sub.add_parser("completion", help="print a completion script")
    completion.add_argument("shell", choices=["bash"])
    args = parser.parse_args(argv)
    if args.what == "man":
        for path in write_manpages(args.directory):
            print(path)
    else:
        sys.stdout.write(bash_completion())
    return 0


if __name__ == "__main__":
    sys.exit(main())
