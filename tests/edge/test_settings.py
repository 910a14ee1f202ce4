"""The settings mechanism itself (edge.settings), on a small settings class of its own."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from edge.errors import ConfigError
from edge.settings import Rule, Schema, sections_of, to_toml, toml_value

PathLabel = str  # a text key whose type name mentions "Path"
Location = Path  # a path key whose type name does not


@dataclass(frozen=True)
class Box:
    label: PathLabel = "p"
    where: Location = Path("here")
    spare: Path | None = None
    size: int = 1
    ratio: float = 0.5
    on: bool = False


@dataclass(frozen=True)
class Extra:
    note: str = ""


@dataclass(frozen=True)
class Toy:
    box: Box = field(default_factory=Box)
    extra: Extra | None = None


SCHEMA = Schema(Toy, rules={("box", "size"): Rule(lambda v: v >= 1, "must be >= 1")})


def test_path_keys_are_found_by_type_not_by_name() -> None:
    assert sections_of(Toy)["box"].path_keys() == ["where", "spare"]
    s = SCHEMA.from_document({"box": {"label": "~/x", "where": "~/y"}}, base_dir=Path("/b"), env={})
    assert s.box.label == "~/x"  # text stays text
    assert s.box.where == Path("~/y").expanduser()


def test_relative_paths_from_the_file_resolve_next_to_it() -> None:
    s = SCHEMA.from_document({"box": {"where": "w", "spare": "/abs"}}, base_dir=Path("/b"), env={})
    assert (s.box.where, s.box.spare) == (Path("/b/w"), Path("/abs"))


def test_types_are_strict_in_the_file_and_parsed_from_the_environment() -> None:
    with pytest.raises(ConfigError) as info:
        SCHEMA.from_document(
            {"box": {"size": "2", "ratio": True, "on": 1, "where": 3}}, env={"EDGEFL_BOX_SIZE": "z"}
        )
    assert sorted(info.value.problems) == [
        "[box] on: must be bool, got int",
        "[box] ratio: must be float, got bool",
        "[box] size: must be int, got str",
        "[box] where: must be a path string, got int",
        "environment EDGEFL_BOX_SIZE: 'z' is not a valid int",
    ]
    s = SCHEMA.from_document(
        {"box": {"ratio": 2}},
        env={"EDGEFL_BOX_ON": "yes", "EDGEFL_BOX_SPARE": "", "EDGEFL_BOX_SIZE": "3"},
    )
    assert (s.box.ratio, s.box.on, s.box.spare, s.box.size) == (2.0, True, None, 3)


def test_optional_sections_exist_only_when_named() -> None:
    assert SCHEMA.from_document({}, env={}).extra is None
    assert SCHEMA.from_document({}, env={"EDGEFL_EXTRA_NOTE": "n"}).extra == Extra(note="n")
    assert SCHEMA.from_document({"extra": {}}, env={}).extra == Extra()


def test_rules_and_type_problems_come_together() -> None:
    with pytest.raises(ConfigError) as info:
        SCHEMA.from_document({"box": {"size": 0, "colour": "red"}, "lid": {}}, env={})
    assert info.value.problems == [
        "unknown section [lid] (known: box, extra)",
        "[box] colour: unknown key (known: label, where, spare, size, ratio, on)",
        "[box] size: must be >= 1 (got 0)",
    ]


def test_the_writer_round_trips_awkward_values(tmp_path: Path) -> None:
    odd = 'quote " backslash \\ tab \t newline \n del \x7f nul-free é 🙂'
    toy = Toy(
        box=Box(label=odd, where=tmp_path / odd.replace("\n", ""), size=-3, ratio=1e-30),
        extra=Extra(),
    )
    path = tmp_path / "toy.toml"
    path.write_text(to_toml(toy))
    with pytest.raises(ConfigError, match="size: must be >= 1"):
        SCHEMA.load(path, env={})
    ok = Toy(box=Box(label=odd, size=3, ratio=float("inf")), extra=Extra(note=odd))
    path.write_text(to_toml(ok, header="two\nlines"))
    assert path.read_text().startswith("# two\n# lines\n\n[box]\n")
    assert SCHEMA.load(path, env={}) == Toy(
        box=Box(label=odd, where=tmp_path / "here", size=3, ratio=float("inf")),
        extra=Extra(note=odd),
    )
    assert toml_value(float("nan")) == "nan"
    with pytest.raises(TypeError):
        toml_value([1])
