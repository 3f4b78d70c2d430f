#!/usr/bin/env python3
"""Cross-checks labgate's MethodSCRIPT handling with code labgate did not write.

  validate FILE...  parse each script with PalmSens' MethodSCRIPT grammar (from the
                    pypalmsens package); print {"FILE": [[line, column, message], ...]}.
                    A script's leading `e` line (the run command, not script text) is
                    made a comment so line numbers stay those of the file. Columns from 1.
  decode            read data packages (`P...` lines) on stdin and decode them with
                    labmcp-palmsens' MethodSCRIPT driver; print [[[type, value], ...], ...]
                    (NaN as null).

scripts/lib.sh (ensure_pytools) installs both packages in a virtualenv.
"""
import json
import math
import os
import site
import sys


def validator():
    # pypalmsens' package __init__ loads its .NET core; the grammar alone does not need it.
    for base in site.getsitepackages():
        root = os.path.join(base, "pypalmsens")
        if os.path.isdir(os.path.join(root, "_methodscript")):
            sys.path.insert(0, root)
            from _methodscript.validate import validate  # noqa: E402

            return validate
    raise SystemExit("pypalmsens is not installed in this Python")


def validate(files):
    check = validator()
    out = {}
    for f in files:
        with open(f, encoding="utf-8") as fh:
            lines = fh.read().split("\n")
        if lines and lines[0].strip() == "e":
            lines[0] = "#"
        problems = []
        try:
            check("\n".join(lines))
        except SyntaxError as e:
            for msg in str(e).split("\n"):
                # "line L:C: message", C from 0
                head, _, text = msg.partition(": ")
                pos = head.removeprefix("line ").split(":")
                problems.append([int(pos[0]), int(pos[1]) + 1, text[:200]])
        out[f] = problems
    print(json.dumps(out))


def decode():
    from labmcp_palmsens.driver import parse_package

    out = []
    for line in sys.stdin:
        line = line.rstrip("\n")
        if not line:
            continue
        out.append(
            [[v.type, None if math.isnan(v.value) else v.value] for v in parse_package(line)]
        )
    print(json.dumps(out))


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "validate":
        validate(sys.argv[2:])
    elif len(sys.argv) == 2 and sys.argv[1] == "decode":
        decode()
    else:
        raise SystemExit(__doc__)
