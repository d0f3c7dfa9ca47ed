"""Reads YAML streams as kubectl and Helm do (YAML 1.1, as PyYAML's safe_load) and prints what
each node is, for tests/chart.rs to compare with the YAML 1.2 reading.

Input (stdin): a JSON list of YAML texts. Output (stdout): a JSON list, per text, of its
documents, each a list of [path, type] pairs, map keys included as [path + "{key}", key type].
Timestamps count as strings: kubectl's YAML-to-JSON conversion keeps them as text.
"""
import datetime
import json
import sys

import yaml


def kind(value):
    if isinstance(value, bool):
        return "bool"
    if value is None:
        return "null"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, (str, bytes, datetime.date, datetime.datetime)):
        return "str"
    if isinstance(value, dict):
        return "map"
    if isinstance(value, list):
        return "seq"
    return type(value).__name__


def walk(value, path, out):
    out.append([path, kind(value)])
    if isinstance(value, dict):
        for key, child in value.items():
            out.append([path + "{" + str(key) + "}", kind(key)])
            walk(child, path + "." + str(key), out)
    elif isinstance(value, list):
        for i, child in enumerate(value):
            walk(child, path + "[" + str(i) + "]", out)


def main():
    texts = json.load(sys.stdin)
    result = []
    for text in texts:
        documents = []
        for document in yaml.safe_load_all(text):
            if document is None:
                continue
            out = []
            walk(document, "", out)
            documents.append(out)
        result.append(documents)
    json.dump(result, sys.stdout)


main()
