"""Scraping and reading Prometheus text exposition in tests (the client's own parser)."""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Scrape:
    """One parsed scrape: family names and every sample by (name, labels)."""

    families: dict[str, str]  # family name -> type
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]

    @property
    def sample_names(self) -> set[str]:
        """Names of the samples present in this scrape."""
        return {name for name, _ in self.samples}

    @property
    def series_names(self) -> set[str]:
        """Names a query may select: present samples, plus those of declared families that
        have no sample yet (a labelled family before its first label set)."""
        suffixes = {
            "counter": ("_total",),
            "histogram": ("_bucket", "_sum", "_count"),
            "summary": ("", "_sum", "_count"),
        }
        names = set(self.sample_names)
        for family, kind in self.families.items():
            names.update(family + suffix for suffix in suffixes.get(kind, ("",)))
        return names

    def value(self, name: str, **labels: str) -> float:
        """The value of the sample ``name`` with exactly ``labels``."""
        key = (name, frozenset(labels.items()))
        if key not in self.samples:
            near = [dict(k[1]) for k in self.samples if k[0] == name]
            raise AssertionError(f"no sample {name}{labels}; samples of that name: {near}")
        return self.samples[key]

    def labelled(self, name: str, label: str) -> dict[str, float]:
        """``{label value: sample value}`` of every sample ``name`` (one label varying)."""
        return {dict(k[1])[label]: v for k, v in self.samples.items() if k[0] == name}


def parse(text: str) -> Scrape:
    families: dict[str, str] = {}
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return Scrape(families, samples)


def scrape(url: str, timeout: float = 30.0) -> tuple[str, Scrape]:
    """GET ``url``; returns (Content-Type, parsed body)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:  # loopback only
        content_type = response.headers.get("Content-Type", "")
        body = response.read().decode("utf-8")
    return content_type, parse(body)
