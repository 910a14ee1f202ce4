"""The docs stay true: generated reference current, links resolve, commands parse.

* ``docs/reference.md`` equals what ``scripts/gen_reference.py`` renders from the
  ``.proto`` files and ``protos/topics.py`` now;
* every relative link in ``docs/*.md`` and ``README.md`` names an existing file, and
  a ``#fragment`` into a Markdown file names one of its headings;
* every ``edgefl …`` command in a shell code block parses with the real argument
  parser, and every ``edgefl …`` in inline code names a real command whose ``--options``
  exist. Each distinct command prefix's ``--help`` is rendered too.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import re
import shlex
import sys
from pathlib import Path
from types import ModuleType

import pytest

from edge.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINKED_FILES = [*DOCS, ROOT / "README.md"]
SHELL_LANGS = {"bash", "sh", "shell", "console"}

_FENCE = re.compile(r"^(`{3,}|~{3,})\s*([\w+-]*)")
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_INLINE_CODE = re.compile(r"(`+)(.+?)\1")


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "gen_reference", ROOT / "scripts" / "gen_reference.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def _split(text: str) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """(fenced code blocks as (language, lines), prose lines) of a Markdown text."""
    blocks: list[tuple[str, list[str]]] = []
    prose: list[str] = []
    fence: str | None = None
    for line in text.splitlines():
        match = _FENCE.match(line.strip())
        if fence is None and match:
            fence = match.group(1)
            blocks.append((match.group(2).lower(), []))
        elif fence is not None and line.strip().startswith(fence):
            fence = None
        elif fence is not None:
            blocks[-1][1].append(line)
        else:
            prose.append(line)
    return blocks, prose


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[`*_]{1,2}(?=\S)|(?<=\S)[`*_]{1,2}", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    _blocks, prose = _split(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    anchors: set[str] = set()
    for line in prose:
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = _slug(match.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _links(path: Path) -> list[str]:
    _blocks, prose = _split(path.read_text(encoding="utf-8"))
    found: list[str] = []
    for line in prose:
        without_code = _INLINE_CODE.sub("", line)
        found += _LINK.findall(without_code)
    return found


def _shell_commands(text: str) -> list[list[str]]:
    """argv of every ``edgefl …`` line in shell code blocks (continuations joined)."""
    blocks, _prose = _split(text)
    commands: list[list[str]] = []
    for lang, lines in blocks:
        if lang not in SHELL_LANGS:
            continue
        joined: list[str] = []
        for line in lines:
            if joined and joined[-1].endswith("\\"):
                joined[-1] = joined[-1][:-1] + " " + line.strip()
            else:
                joined.append(line.strip())
        for line in joined:
            line = line.removeprefix("$ ").strip()
            if not line.startswith("edgefl "):
                continue
            words = shlex.split(line, comments=True)
            for stop in ("|", "&&", ";", ">", "2>&1"):
                if stop in words:
                    words = words[: words.index(stop)]
            commands.append(words[1:])
    return commands


def _inline_commands(text: str) -> list[list[str]]:
    """Words of every inline code span that starts with ``edgefl `` and is not output.

    Output lines quoted in prose (``edgefl edge: serving on …``) are skipped: their
    first word ends with a colon.
    """
    _blocks, prose = _split(text)
    spans: list[list[str]] = []
    for line in prose:
        for _ticks, code in _INLINE_CODE.findall(line):
            code = code.strip()
            words = code.split()[1:]
            if code.startswith("edgefl ") and not words[0].endswith(":"):
                spans.append(words)
    return spans


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _resolve(words: list[str]) -> tuple[list[str], argparse.ArgumentParser]:
    """(the command prefix among ``words``, its parser); global options are skipped."""
    parser = build_parser()
    prefix: list[str] = []
    for word in words:
        if word.startswith("-") and not prefix:
            continue  # edgefl -v …
        sub = _subparsers(parser)
        if word not in sub:
            break
        parser = sub[word]
        prefix.append(word)
    return prefix, parser


def _parse(argv: list[str]) -> str:
    """Parse ``argv`` with the real parser; '' on success, else argparse's message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(argv)
    except SystemExit as exc:
        return err.getvalue().strip() or f"exit {exc.code}"
    return ""


def _all_docs_text() -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in DOCS}


# -- tests ------------------------------------------------------------------------------


def test_the_docs_exist() -> None:
    names = {p.name for p in DOCS}
    expected = {
        "architecture.md",
        "operator-guide.md",
        "device-guide.md",
        "troubleshooting.md",
        "scaling.md",
        "reference.md",
    }
    assert expected <= names, f"missing: {sorted(expected - names)}"


def test_reference_is_up_to_date() -> None:
    generator = _load_generator()
    expected = generator.render()
    current = (ROOT / "docs" / "reference.md").read_text(encoding="utf-8")
    assert current == expected, "docs/reference.md is stale: run scripts/gen_reference.py"


def test_reference_names_every_rpc_and_topic() -> None:
    from protos import topics
    from protos.edgefl.v1 import local_data_pb2, trainer_pb2
    from protos.kserve import grpc_predict_v2_pb2

    text = (ROOT / "docs" / "reference.md").read_text(encoding="utf-8")
    for module in (local_data_pb2, trainer_pb2, grpc_predict_v2_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            assert f"service `{service.full_name}`" in text
            for method in service.methods:
                assert f"| `{method.name}` |" in text
    assert topics.release_manifest("X").replace("/X/", "/{fleet}/") in text
    assert "pattern read edgefl/{fleet}/release/#" in text


@pytest.mark.parametrize("doc", LINKED_FILES, ids=lambda p: p.name)
def test_relative_links_resolve(doc: Path) -> None:
    problems: list[str] = []
    for target in _links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            continue  # http:, https:, mailto:
        file_part, _, fragment = target.partition("#")
        path = doc if not file_part else (doc.parent / file_part).resolve()
        if not path.exists():
            problems.append(f"{target}: no such file")
        elif fragment and path.suffix == ".md" and fragment not in _anchors(path):
            problems.append(f"{target}: no heading #{fragment} in {path.name}")
    assert not problems, f"{doc.name}: " + "; ".join(problems)


def test_shell_commands_in_docs_parse() -> None:
    problems: list[str] = []
    count = 0
    for name, text in _all_docs_text().items():
        for argv in _shell_commands(text):
            count += 1
            message = _parse(argv)
            if message:
                problems.append(f"{name}: edgefl {' '.join(argv)}: {message}")
    assert count >= 10, "expected the guides to show edgefl commands"
    assert not problems, "\n".join(problems)


def test_inline_commands_name_real_commands_and_options() -> None:
    problems: list[str] = []
    prefixes: set[tuple[str, ...]] = set()
    for name, text in _all_docs_text().items():
        commands = _inline_commands(text) + _shell_commands(text)
        for words in commands:
            prefix, parser = _resolve(words)
            if not prefix and all(w.startswith("-") or w == "…" for w in words):
                continue  # only global options, e.g. `edgefl -v …`
            if not prefix:
                problems.append(f"{name}: `edgefl {' '.join(words)}` names no command")
                continue
            prefixes.add(tuple(prefix))
            known = set(parser._option_string_actions)
            for word in words:
                option = word.split("=", 1)[0]
                if option.startswith("--") and option not in known:
                    problems.append(
                        f"{name}: `edgefl {' '.join(words)}`: {option} is not an option "
                        f"of `edgefl {' '.join(prefix)}`"
                    )
    assert not problems, "\n".join(problems)
    # Every distinct prefix renders its --help (exit 0).
    for command in sorted(prefixes):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exc:
            build_parser().parse_args([*command, "--help"])
        assert exc.value.code == 0, command
        assert out.getvalue().startswith(f"usage: edgefl {' '.join(command)}")


def test_readme_says_how_to_get_edgefl_on_path() -> None:
    """The "Using it" commands need ``edgefl`` on PATH: the README says how (#17.6)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Using it", 1)[1].split("\n## ", 1)[0]
    assert "source .venv/bin/activate" in section and ".venv/bin/edgefl" in section
    assert (ROOT / ".venv").name in (ROOT / "scripts" / "demo.sh").read_text()


def test_troubleshooting_describes_the_current_cloud_errors() -> None:
    """Stale claims (#17.9): settings errors end without a traceback, a busy port is
    reported by `cloud up` itself."""
    text = (ROOT / "docs" / "troubleshooting.md").read_text(encoding="utf-8")
    assert "ends with a traceback" not in text
    assert "may not notice" not in text
    from cloud.commands import EXIT_INTERRUPTED

    assert f"exit code is {EXIT_INTERRUPTED}" in text


#: Which test runs each documented ``edgefl`` command (#17: every command in README and
#: docs is run by a test). Each entry names a test function that runs the command's CLI
#: (or, marked "function", the function the command calls with the same arguments).
COMMAND_TESTS = {
    "doctor": "tests/test_cli.py::test_doctor_reports_every_component_and_passes_here",
    "cloud init": "tests/cloud/test_fleet_ports.py::test_cloud_init_writes_fixed_ports",
    "cloud up": "tests/cloud/test_cloud_cli.py::test_one_cloud_per_data_dir_status_and_pin_find_it",
    "cloud status": "tests/cloud/test_cloud_cli.py::test_one_cloud_per_data_dir_status_and_pin_find_it",
    "cloud model list": "tests/cloud/test_cloud_settings.py::test_model_list_shows_versions_and_the_current_one",
    "cloud model pin": "tests/cloud/test_cloud_cli.py::test_one_cloud_per_data_dir_status_and_pin_find_it",
    "cloud bridge-config": "tests/e2e/test_bridges.py::test_releases_reach_devices_on_every_regional_broker_and_survive_a_restart",
    "devices profiles": "tests/devices/test_profiles.py::test_cli_lists_profiles",
    "devices flash": "tests/devices/test_flash.py::test_cli_flash_twice",
    "devices revoke": "tests/devices/test_flash.py::test_cli_flash_twice",
    "devices emulate": "tests/devices/test_emulate_cli.py::test_emulate_needs_a_cloud_then_serves_and_stops",
    "cloud rollout status": "tests/e2e/test_rollout.py::test_staged_rollout_good_bad_and_silent_devices",
    "cloud rollout promote": "tests/e2e/test_rollout.py::test_staged_rollout_good_bad_and_silent_devices",
    "cloud rollout halt": "tests/e2e/test_rollout.py::test_staged_rollout_good_bad_and_silent_devices",
    "edge data load-digits": "tests/edge/test_load_digits_cli.py::test_load_digits_through_the_device_then_direct",
}
#: Documented commands no test runs yet. This list may only shrink: a new documented
#: command needs an entry in COMMAND_TESTS.
NOT_YET_RUN: set[str] = set()


def _command_path(argv: list[str]) -> str:
    """``cloud model pin`` for ``["cloud", "model", "pin", "4", "--config", …]``."""
    parser: argparse.ArgumentParser = build_parser()
    path: list[str] = []
    for word in argv:
        subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subparsers or word not in subparsers[0].choices:
            break
        path.append(word)
        parser = subparsers[0].choices[word]
    return " ".join(path)


def test_every_documented_command_is_run_by_a_named_test() -> None:
    documented: set[str] = set()
    for path in LINKED_FILES:
        for argv in _shell_commands(path.read_text(encoding="utf-8")):
            documented.add(_command_path(argv))
    documented.discard("")
    missing = documented - set(COMMAND_TESTS) - NOT_YET_RUN
    assert not missing, f"documented commands no test runs: {sorted(missing)}"
    assert documented >= NOT_YET_RUN, "NOT_YET_RUN names a command the docs no longer show"
    for command, node in COMMAND_TESTS.items():
        file, func = node.split("::")
        source = (ROOT / file).read_text(encoding="utf-8")
        assert f"def {func}(" in source, f"{command}: {node} does not exist"
        words = command.split()
        assert all(f'"{w}"' in source for w in words), f"{node} does not run `{command}`"
