"""Checks that the chart refuses each value set in refusals.txt, in a template (`fail`) or by
values.schema.json (as `helm install` does), with a message holding the expected words.

usage: check-refusals.py RENDERER   (the renderer ../shared/tools/chart-check/run builds; run with
its venv's python, which has jsonschema)
"""
import json
import pathlib
import shlex
import subprocess
import sys
import tempfile

import jsonschema

HERE = pathlib.Path(__file__).resolve().parent
CHART = HERE.parent


def refusal(render: str, flags: list[str]) -> str:
    """The chart's refusal message for these flags, or "" when it accepts them."""
    with tempfile.NamedTemporaryFile(suffix=".json") as dump:
        run = subprocess.run([render, *flags, "--dump-values", dump.name, str(CHART)],
                             capture_output=True, text=True)
        if run.returncode != 0:
            return run.stderr.strip()
        values = json.load(open(dump.name))
    schema = json.load(open(CHART / "values.schema.json"))
    errors = jsonschema.Draft7Validator(schema).iter_errors(values)
    return "\n".join(sorted("/".join(map(str, e.path)) + ": " + e.message for e in errors))


def main() -> int:
    bad = 0
    for line in (HERE / "refusals.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, flags, words = (part.strip() for part in line.split("|"))
        message = refusal(sys.argv[1], shlex.split(flags))
        if not message:
            print(f"FAIL {name}: accepted, should have been refused")
            bad = 1
        elif words not in message:
            print(f"FAIL {name}: refused without naming {words!r}:\n{message}")
            bad = 1
        else:
            said = [line for line in message.splitlines() if words in line][-1]
            print(f"ok   {name}: ...{said[max(0, said.rindex(words) - 80):]}")
    return bad


if __name__ == "__main__":
    sys.exit(main())
