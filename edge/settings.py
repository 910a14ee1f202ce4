"""The one settings mechanism: typed sections read from TOML, ``EDGEFL_`` overrides, a writer.

Both the device settings (:mod:`edge.config`, ``edge.toml``) and the cloud settings
(:mod:`cloud.config`, ``cloud.toml``) are declared with it:

* a **settings class** is a dataclass whose fields are *sections*; a section is a
  dataclass of keys, each with a default. A section annotated ``X | None`` (default
  ``None``) exists only when the file has it or an environment variable names it.
* a :class:`Schema` adds **rules** (one key: a predicate and what it requires) and
  **checks** (across keys) and loads files with :meth:`Schema.load`.
* :func:`to_toml` writes settings as a file :meth:`Schema.load` reads back.

Key types are ``str``, ``int``, ``float``, ``bool`` and ``Path``, each optionally
``| None``. A TOML value must have the key's type (an integer is accepted for a float);
a ``Path`` key takes a string and expands ``~``. Path keys are found by their type.
Where relative paths resolve is the schema's policy (``relative_to_file`` and its
``finish`` step): each settings module's docstring says which.

Environment variables ``EDGEFL_<SECTION>_<KEY>`` (upper case) override the file. The
text is parsed for the key's type (bool: 1/0, true/false, yes/no, on/off; an empty value
sets a ``| None`` key to None). A variable naming a section of the schema but an
unknown key, or no key, is an error; variables whose first word is not a section of the
schema belong to something else (the other side's settings, test and bootstrap
switches such as ``EDGEFL_WITH_BROWSER``) and are left alone.

Unknown sections and keys, values of the wrong type, and broken rules or checks are all
collected and raised together in one ConfigError (the schema's ``error`` class).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar, Union

from edge.errors import ConfigError

__all__ = [
    "ENV_PREFIX",
    "ConfigError",
    "Rule",
    "Schema",
    "SectionInfo",
    "sections_of",
    "to_toml",
    "toml_value",
]

ENV_PREFIX = "EDGEFL_"
"""Prefix of environment variables that override settings."""

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_KEY_TYPES = (str, int, float, bool, Path)

S = TypeVar("S")


@dataclass(frozen=True)
class Rule:
    """What one key's value must satisfy: ``check(value)`` is true, else ``message``."""

    check: Callable[[Any], bool]
    message: str


@dataclass(frozen=True)
class SectionInfo:
    """A section as the loader sees it: its class and each key's type and default."""

    name: str
    klass: type
    optional: bool
    """``X | None``: absent unless the file or the environment names it."""
    types: dict[str, tuple[type, bool]]
    """Key → (its type, whether None is allowed)."""
    defaults: dict[str, Any]

    def path_keys(self) -> list[str]:
        """Keys of type ``Path`` (or ``Path | None``), found by their annotation."""
        return [key for key, (kind, _) in self.types.items() if kind is Path]


def _unwrap(hint: Any) -> tuple[Any, bool]:
    """(the annotation without ``| None``, whether None is allowed)."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"settings keys take one type (or it | None), not {hint}")
        return args[0], True
    return hint, False


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"settings key {f.name} has no default")


def sections_of(settings_type: type) -> dict[str, SectionInfo]:
    """The sections of a settings class: its fields whose type is a dataclass."""
    out: dict[str, SectionInfo] = {}
    hints = typing.get_type_hints(settings_type)
    for f in dataclasses.fields(settings_type):
        klass, optional = _unwrap(hints[f.name])
        if not (isinstance(klass, type) and dataclasses.is_dataclass(klass)):
            continue  # not a section (e.g. where the settings came from)
        key_hints = typing.get_type_hints(klass)
        key_types: dict[str, tuple[type, bool]] = {}
        for key_field in dataclasses.fields(klass):
            kind, nullable = _unwrap(key_hints[key_field.name])
            if kind not in _KEY_TYPES:
                raise TypeError(f"[{f.name}] {key_field.name}: unsupported type {kind}")
            key_types[key_field.name] = (kind, nullable)
        out[f.name] = SectionInfo(
            name=f.name,
            klass=klass,
            optional=optional,
            types=key_types,
            defaults={kf.name: _default(kf) for kf in dataclasses.fields(klass)},
        )
    return out


def _expand(text: str, where: str) -> tuple[Path | None, str | None]:
    """``~`` and ``~user`` expanded, or a problem naming the setting."""
    if "\0" in text:
        return None, f"{where}: a path cannot contain a NUL character"
    try:
        return Path(text).expanduser(), None
    except RuntimeError:
        return None, f"{where}: cannot expand ~ in {text!r} (no such user or no home directory)"


def _from_toml(value: Any, kind: type, where: str, base_dir: Path | None) -> tuple[Any, str | None]:
    """A TOML value checked against (and converted to) the key's type: (value, problem)."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value), None
    if kind is Path:
        if not isinstance(value, str):
            return None, f"{where}: must be a path string, got {type(value).__name__}"
        path, problem = _expand(value, where)
        if path is not None and base_dir is not None and not path.is_absolute():
            path = base_dir / path
        return path, problem
    if kind is int and isinstance(value, bool):
        return None, f"{where}: must be an integer, got a boolean"
    if not isinstance(value, kind):
        return None, f"{where}: must be {kind.__name__}, got {type(value).__name__}"
    return value, None


def _from_env(text: str, kind: type, nullable: bool, where: str) -> tuple[Any, str | None]:
    """An environment variable's text parsed as the key's type: (value, problem)."""
    if nullable and text == "":
        return None, None
    if kind is Path:
        return _expand(text, where)
    if kind is str:
        return text, None
    try:
        if kind is bool:
            if text.lower() in _TRUE:
                return True, None
            if text.lower() in _FALSE:
                return False, None
            raise ValueError(text)
        if kind is int:
            return int(text), None
        return float(text), None
    except ValueError:
        return None, f"{where}: {text!r} is not a valid {kind.__name__}"


_Convert = Callable[[type, bool, str], tuple[Any, str | None]]
"""(key type, None allowed, where) → (value, problem): one given value's conversion."""


def _toml_converter(raw: Any, base_dir: Path | None) -> _Convert:
    return lambda kind, _nullable, where: _from_toml(raw, kind, where, base_dir)


def _env_converter(text: str) -> _Convert:
    return lambda kind, nullable, where: _from_env(text, kind, nullable, where)


class Schema(Generic[S]):
    """How one settings class is loaded, checked and reported.

    ``rules`` maps ``(section, key)`` to a :class:`Rule`; ``checks`` are functions of
    the whole settings that return problems spanning several keys. ``relative_to_file``:
    relative paths written in the file resolve against the file's directory (paths from
    the environment stay as given, i.e. relative to the working directory).
    ``finish(settings, base_dir, given)`` derives what depends on other values after
    loading (``base_dir`` is the file's directory or None; ``given`` the
    ``(section, key)`` pairs the file or the environment set). ``missing_hint`` is
    appended when the file does not exist.
    """

    def __init__(
        self,
        settings: type[S],
        *,
        error: type[ConfigError] = ConfigError,
        rules: Mapping[tuple[str, str], Rule] | None = None,
        checks: Sequence[Callable[[S], Iterable[str]]] = (),
        relative_to_file: bool = True,
        finish: Callable[[S, Path | None, frozenset[tuple[str, str]]], S] | None = None,
        missing_hint: str = "",
    ) -> None:
        self.settings = settings
        self.sections = sections_of(settings)
        self.error = error
        self.rules = dict(rules or {})
        for section, key in self.rules:
            if key not in self.sections[section].types:
                raise TypeError(f"rule for unknown key [{section}] {key}")
        self.checks = tuple(checks)
        self.relative_to_file = relative_to_file
        self.finish = finish
        self.missing_hint = missing_hint

    # -- reading ---------------------------------------------------------------------

    def load(self, path: Path | str | None = None, *, env: Mapping[str, str] | None = None) -> S:
        """Read ``path`` (TOML; None: defaults only) with ``EDGEFL_*`` overrides from ``env``.

        ``env`` defaults to ``os.environ``. Raises the schema's ConfigError listing every
        problem.
        """
        if path is None:
            return self.from_document({}, base_dir=None, env=env)
        path = Path(path)
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            hint = f" ({self.missing_hint})" if self.missing_hint else ""
            raise self.error([f"cannot read {path}: no such file{hint}"]) from exc
        except OSError as exc:
            raise self.error([f"cannot read {path}: {exc.strerror or exc}"]) from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise self.error([f"{path} is not valid TOML: {exc}"]) from exc
        return self.from_document(doc, base_dir=path.resolve().parent, env=env)

    def from_document(
        self,
        doc: Mapping[str, Any],
        *,
        base_dir: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> S:
        """Settings from a parsed TOML document (``base_dir``: the file's directory)."""
        problems: list[str] = []
        overrides = self._overrides(os.environ if env is None else env, problems)
        known = ", ".join(self.sections)
        for name in doc:
            if name not in self.sections:
                problems.append(f"unknown section [{name}] (known: {known})")
        given: set[tuple[str, str]] = set()
        built: dict[str, Any] = {}
        file_base = base_dir if self.relative_to_file else None
        for name, section in self.sections.items():
            table = doc.get(name)
            if table is not None and not isinstance(table, dict):
                problems.append(f"[{name}] must be a table")
                table = None
            if section.optional and table is None and name not in overrides:
                built[name] = None
                continue
            # (key, where it came from, what an unknown-key problem adds, its conversion)
            given_here: list[tuple[str, str, str, _Convert]] = [
                (key, f"[{name}] {key}", "", _toml_converter(raw, file_base))
                for key, raw in (table or {}).items()
            ]
            given_here += [
                (
                    key,
                    f"environment {ENV_PREFIX}{name.upper()}_{key.upper()}",
                    f" {key!r} in [{name}]",
                    _env_converter(text),
                )
                for key, text in overrides.get(name, {}).items()
            ]
            values: dict[str, Any] = {}
            for key, where, which, convert in given_here:
                if key not in section.types:
                    known = ", ".join(section.types)
                    problems.append(f"{where}: unknown key{which} (known: {known})")
                    continue
                kind, nullable = section.types[key]
                value, problem = convert(kind, nullable, where)
                if problem:
                    problems.append(problem)
                else:
                    values[key] = value
            given.update((name, key) for key in values)
            built[name] = section.klass(**values)
        settings = self.settings(**built)
        if self.finish is not None:
            settings = self.finish(settings, base_dir, frozenset(given))
        problems.extend(self.problems(settings))
        if problems:
            raise self.error(problems)
        return settings

    def _overrides(self, env: Mapping[str, str], problems: list[str]) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        for name, value in env.items():
            if not name.startswith(ENV_PREFIX):
                continue
            section, _, key = name[len(ENV_PREFIX) :].lower().partition("_")
            if section not in self.sections:
                continue  # another tool's variable (the other side, tests, bootstrap)
            if not key:
                problems.append(f"environment {name}: names no key")
                continue
            out.setdefault(section, {})[key] = value
        return out

    # -- checking --------------------------------------------------------------------

    def problems(self, settings: S) -> list[str]:
        """What breaks the rules and checks in ``settings`` (empty when valid)."""
        problems: list[str] = []
        for (name, key), rule in self.rules.items():
            section = getattr(settings, name)
            if section is None:
                continue
            value = getattr(section, key)
            if not rule.check(value):
                problems.append(f"[{name}] {key}: {rule.message} (got {value!r})")
        for check in self.checks:
            problems.extend(check(settings))
        return problems

    def validate(self, settings: S) -> None:
        """Raise the schema's ConfigError when ``settings`` break a rule or check."""
        problems = self.problems(settings)
        if problems:
            raise self.error(problems)


# -- writing -------------------------------------------------------------------------


def _toml_string(text: str) -> str:
    out = ['"']
    for ch in text:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch < " " or ch == "\x7f":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def toml_value(value: object) -> str:
    """``value`` (str, Path, bool, int or float) as a TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str | Path):
        return _toml_string(str(value))
    raise TypeError(f"no TOML form for {type(value).__name__}")


def to_toml(settings: object, *, header: str = "") -> str:
    """``settings`` as a complete TOML file that its schema loads back to equal values.

    Every key of every section is written except keys set to None (None is what a
    missing key means) and optional sections that are not set. ``header`` lines come
    first, as ``#`` comments.
    """
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    if lines:
        lines.append("")
    for name, info in sections_of(type(settings)).items():
        section = getattr(settings, name)
        if section is None:
            continue
        lines.append(f"[{name}]")
        for key in info.types:
            value = getattr(section, key)
            if value is not None:
                lines.append(f"{key} = {toml_value(value)}")
        lines.append("")
    return "\n".join(lines)
