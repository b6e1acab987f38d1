"""The envelope every benchmark's results file carries: device, jax version, date (UTC),
the command that made it, and the rows."""

import datetime
import json
import sys

import jax


def write_results(script: str, argv, rows: list, out) -> dict:
    """The envelope around rows; written as JSON to `out` when given."""
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
              "command": f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:]),
              "results": rows}
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    return result
