"""Parses an OpenMetrics exposition (Prometheus' scrape format, as `/metrics` serves it) from
stdin with the `prometheus_client` package's strict parser (PyPI; an implementation of the
format we did not write) and prints every sample as JSON:
[{"family": ..., "type": ..., "name": ..., "labels": {...}, "value": ...}, ...].
A malformed exposition (a missing `# EOF`, a sample of an undeclared family, a bad value)
fails the parse, and so the test."""
import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families

samples = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        samples.append({"family": family.name, "type": family.type, "name": s.name,
                        "labels": s.labels, "value": s.value})
print(json.dumps(samples))
