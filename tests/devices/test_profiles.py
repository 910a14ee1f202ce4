"""Board profiles: every shipped one validates; a broken one lists all its problems."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from devices.profiles import ProfileError, list_profiles, load_profile, load_profile_file

SHIPPED = {"rpi4", "rpi5", "rpi-zero-2w", "jetson-orin-nano", "x86-64-gateway"}


def test_the_five_boards_ship() -> None:
    assert set(list_profiles()) == SHIPPED


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_profile_validates(name: str) -> None:
    profile = load_profile(name)
    assert profile.name == name
    assert profile.hardware.arch in ("aarch64", "x86_64")
    assert profile.litert.threads <= profile.hardware.cores
    assert profile.limits  # every board states what it cannot do


def test_zero_2w_trains_and_states_its_margin() -> None:
    zero = load_profile("rpi-zero-2w")
    assert zero.hardware.ram_mb == 512
    assert zero.training.enabled is True and zero.training.epochs == 1
    assert "not on this board" in zero.limits and "MB" in zero.limits
    assert "serve only" in zero.limits  # how to turn training off


def test_an_operators_own_profile_file_loads_by_path(tmp_path: Path) -> None:
    source = (Path(__file__).resolve().parents[2] / "devices" / "profiles" / "rpi-zero-2w.toml")
    own = tmp_path / "zero-serve.toml"
    own.write_text(
        source.read_text()
        .replace('name = "rpi-zero-2w"', 'name = "zero-serve"')
        .replace("[training]\nenabled = true", "[training]\nenabled = false")
    )
    prof = load_profile(str(own))
    assert prof.name == "zero-serve" and prof.training.enabled is False
    with pytest.raises(ProfileError, match="cannot read"):
        load_profile(str(tmp_path / "missing.toml"))
    misnamed = tmp_path / "other.toml"
    misnamed.write_text(own.read_text())
    with pytest.raises(ProfileError):
        load_profile(str(misnamed))  # its name must match its file name


def test_unknown_key_and_bad_type_are_reported_together(tmp_path: Path) -> None:
    source = (
        Path(__file__).resolve().parents[2] / "devices" / "profiles" / "rpi4.toml"
    ).read_text()
    broken = source.replace("cores = 4", 'cores = "four"').replace(
        "[litert]", "[litert]\nturbo = true"
    )
    path = tmp_path / "rpi4.toml"
    path.write_text(broken)
    with pytest.raises(ProfileError) as info:
        load_profile_file(path)
    problems = info.value.problems
    assert "hardware.cores: must be int, got str" in problems
    assert any(p.startswith("litert.turbo: unknown key") for p in problems)
    assert len(problems) == 2


def test_missing_sections_range_and_name_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "board.toml"
    path.write_text(
        'name = "other"\ntitle = "T"\n'
        '[hardware]\narch = "armv7l"\ncpu = "x"\ncores = 4\nram_mb = 1024\n'
    )
    with pytest.raises(ProfileError) as info:
        load_profile_file(path)
    text = str(info.value)
    for expected in (
        "hardware.arch: must be one of",
        "os: missing",
        "litert: missing",
        "training: missing",
        "data: missing",
        "differs from the file name 'board'",
    ):
        assert expected in text


def test_unknown_profile_lists_the_known_ones() -> None:
    with pytest.raises(ProfileError, match="rpi5"):
        load_profile("pdp-11")


def test_cli_lists_profiles() -> None:
    edgefl = Path(sys.executable).parent / "edgefl"
    res = subprocess.run(
        [str(edgefl), "devices", "profiles"], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    for name in SHIPPED:
        assert name in res.stdout
    zero = next(line for line in res.stdout.splitlines() if line.startswith("rpi-zero-2w "))
    assert "train+serve" in zero
