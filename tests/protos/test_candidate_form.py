"""Candidate manifests (staged rollouts): their own signed form, validation, round trip."""

from __future__ import annotations

import dataclasses

import pytest

from protos import codec, signing
from protos.errors import ManifestError
from tests.protos.test_codec_release import make_manifest


def _candidate(**overrides: object) -> codec.Manifest:
    fields: dict[str, object] = dict(phase=1, cohort_ppm=250_000, action="check", served_version=2)
    fields.update(overrides)
    return make_manifest(**fields)


def test_candidate_signed_form_has_its_own_header_and_trailing_lines() -> None:
    data = codec.manifest_signing_bytes(_candidate())
    assert data.startswith(b"edgefl.release-candidate.v1\n")
    assert data.endswith(
        b"sequence=17\nphase=1\ncohort_ppm=250000\nserved_version=2\naction=5:check\n"
    )
    release = codec.manifest_signing_bytes(make_manifest())
    assert release.startswith(codec.SIGNED_FORM_PREFIX) and b"phase=" not in release
    # Apart from the header and the four candidate lines, the bytes are the release's.
    body = data.removeprefix(codec.CANDIDATE_FORM_PREFIX)
    assert release.removeprefix(codec.SIGNED_FORM_PREFIX) == body.split(b"phase=")[0]


def test_a_candidate_signature_never_passes_as_a_release_or_another_action() -> None:
    key = signing.generate_private_key()
    signed = signing.sign_manifest(_candidate(action="check"), key)
    signing.verify_manifest(signed, key.public_key())
    as_release = dataclasses.replace(signed, phase=0, cohort_ppm=0, action="", served_version=0)
    with pytest.raises(signing.SignatureError):
        signing.verify_manifest(as_release, key.public_key())
    for change in ({"action": "serve"}, {"cohort_ppm": 1_000_000}, {"served_version": 1}):
        with pytest.raises(signing.SignatureError):
            signing.verify_manifest(dataclasses.replace(signed, **change), key.public_key())  # type: ignore[arg-type]


def test_candidates_round_trip_and_bad_ones_are_named() -> None:
    m = _candidate(action="revert")
    back = codec.manifest_from_bytes(codec.manifest_to_bytes(m))
    assert back == m and back.candidate
    for overrides, needle in (
        ({"action": "explode"}, "action 'explode'"),
        ({"cohort_ppm": 0}, "cohort_ppm must be in 1..1000000"),
        ({"cohort_ppm": 1_000_001}, "cohort_ppm must be in 1..1000000"),
        ({"pinned": True}, "a candidate cannot be pinned"),
        ({"served_version": 3}, "served_version 3 must be"),
        ({"phase": -1}, "phase must be"),
    ):
        with pytest.raises(ManifestError, match=needle):
            codec.manifest_from_bytes(codec.manifest_to_bytes(_candidate(**overrides)))
    with pytest.raises(ManifestError, match="a promoted release"):
        codec.manifest_from_bytes(codec.manifest_to_bytes(make_manifest(action="serve")))
