"""Reading a Prometheus scrape in tests: ``Scrape.parse(text).value(name, **labels)``."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Scrape:
    """One ``/metrics`` answer: every sample, and every family named in it."""

    text: str
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]
    families: dict[str, str]
    """Family name → type (a family with no sample yet is listed too)."""

    @classmethod
    def parse(cls, text: str) -> Scrape:
        samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        families: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            families[family.name] = family.type
            for sample in family.samples:
                samples[sample.name, frozenset(sample.labels.items())] = sample.value
        return cls(text, samples, families)

    def value(self, name: str, **labels: str) -> float | None:
        """The sample with exactly these labels, or None."""
        return self.samples.get((name, frozenset(labels.items())))

    def total(self, name: str, **labels: str) -> float:
        """The sum of the samples of ``name`` whose labels include ``labels``."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and wanted <= ls)

    def series(self, name: str) -> dict[frozenset[tuple[str, str]], float]:
        return {ls: v for (n, ls), v in self.samples.items() if n == name}

    def names(self) -> set[str]:
        """Every sample name and family name (``x_total`` and ``x`` for a counter)."""
        return {name for name, _ in self.samples} | set(self.families)
