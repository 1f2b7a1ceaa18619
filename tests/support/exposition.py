"""Read the service's real ``/metrics`` over HTTP and look samples up by name and labels."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Exposition:
    text: str

    def samples(self, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        """Every sample called ``name`` whose labels include ``labels``."""
        return [
            (dict(sample.labels), float(sample.value))
            for family in text_string_to_metric_families(self.text)
            for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        ]

    def value(self, name: str, **labels: str) -> float | None:
        """The sum of the matching samples; None when there is none."""
        found = self.samples(name, **labels)
        return sum(v for _, v in found) if found else None

    def label_names(self) -> set[str]:
        return {
            label
            for family in text_string_to_metric_families(self.text)
            for sample in family.samples
            for label in sample.labels
        }


async def get(port: int, path: str, method: str = "GET") -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
        return await client.request(method, path)


async def scrape(port: int) -> Exposition:
    response = await get(port, "/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return Exposition(response.text)
