"""Writes the chart's values table into its README from values.yaml, whose documented keys
carry a comment starting with `# --` (helm-docs style; following `#` lines continue it).

usage: values-table.py [--check]
  --check: fail (listing what differs) unless the README's table is up to date and every
           value is documented, itself or through a documented parent.
"""
import json
import pathlib
import re
import sys

import yaml

CHART = pathlib.Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- values:begin -->", "<!-- values:end -->"
KEY = re.compile(r"^(\s*)([A-Za-z0-9_]+):")


def documented(text):
    """(dotted key, description) for every `# --` comment, in file order."""
    docs, stack, pending = [], [], None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            pending = stripped[4:].strip()
            continue
        if stripped.startswith("#") and pending is not None:
            pending += " " + stripped[1:].strip()
            continue
        m = KEY.match(line)
        if not m:
            if stripped and not stripped.startswith("-"):
                pending = None
            continue
        indent, key = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        if pending is not None:
            docs.append((".".join(k for _, k in stack), pending))
            pending = None
    return docs


def lookup(values, dotted):
    for part in dotted.split("."):
        values = values[part]
    return values


def type_of(value):
    return {bool: "bool", int: "int", float: "float", str: "string", list: "list",
            dict: "object", type(None): "null"}[type(value)]


def leaves(values, prefix=""):
    """Every dotted key whose value is not a non-empty map."""
    for key, value in values.items():
        path = prefix + key
        if isinstance(value, dict) and value:
            yield from leaves(value, path + ".")
        else:
            yield path


def table(values_text):
    values = yaml.safe_load(values_text)
    docs = documented(values_text)
    rows = ["| Key | Type | Default | Description |", "|-----|------|---------|-------------|"]
    for key, text in docs:
        value = lookup(values, key)
        default = json.dumps(value, separators=(",", ":")).replace("|", "\\|")
        rows.append("| `%s` | %s | `%s` | %s |" % (key, type_of(value), default,
                                                   text.replace("|", "\\|")))
    names = [k for k, _ in docs]
    missing = [leaf for leaf in leaves(values)
               if not any(leaf == n or leaf.startswith(n + ".") for n in names)]
    return "\n".join(rows) + "\n", missing


def main():
    values_text = (CHART / "values.yaml").read_text()
    rendered, missing = table(values_text)
    readme_path = CHART / "README.md"
    readme = readme_path.read_text()
    start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    updated = readme[:start] + "\n" + rendered + readme[end:]
    if missing:
        print("values without a `# --` description: " + ", ".join(missing))
        return 1
    if "--check" in sys.argv[1:]:
        if updated != readme:
            print("%s: the values table is out of date; run %s" % (readme_path, sys.argv[0]))
            return 1
        return 0
    readme_path.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
