"""Reads a scrape with prometheus_client's own parsers (PyPI), independently
of hypemand's encoder, and prints every sample as JSON lines:
{"family", "type", "name", "labels", "value"}.

usage: parse_metrics.py openmetrics|prometheus < scrape
"""
import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics
from prometheus_client.parser import text_string_to_metric_families as prometheus

text = sys.stdin.read()
parse = openmetrics if sys.argv[1] == "openmetrics" else prometheus
for family in parse(text):
    for s in family.samples:
        print(json.dumps({
            "family": family.name,
            "type": family.type,
            "name": s.name,
            "labels": s.labels,
            "value": s.value,
        }))
