"""Runs the schemathesis command line (`st run ...`) with one work-around.

On CPython 3.11.7 (this project's CI), `ast.parse` called deep inside hypothesis' strategy
validation can raise `SystemError: AST constructor recursion depth mismatch` (a CPython bug,
python/cpython#106905). hypothesis only parses there to describe a lambda for its error
messages, so a description it could not work out ("<unknown>", what it uses whenever it is
confused) is returned instead of aborting the run. Nothing about the requests or the checks
changes.
"""

import inspect
import sys

from hypothesis.internal import lambda_sources

_describe = lambda_sources._lambda_description


def _lambda_description(f, *args, **kwargs):
    try:
        return _describe(f, *args, **kwargs)
    except SystemError:
        params = str(inspect.signature(f))[1:-1]
        return f"lambda {params}: <unknown>" if params else "lambda: <unknown>"


lambda_sources._lambda_description = _lambda_description

if __name__ == "__main__":
    from schemathesis.cli import schemathesis

    sys.argv[0] = "st"
    sys.exit(schemathesis())
