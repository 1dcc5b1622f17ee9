"""Run `python -m eb_jax.main` on many argument lists in one process start.

    python -m tests.cli_batch CASES.json OUTDIR   (from the repository root)

CASES.json is a list of argument lists. The libraries are imported once; each case then
runs in a forked child, as its own command would (absl's flags are process-global, so a
fresh process per case, not a loop), with its exit status and its stdout and stderr
written to OUTDIR/results.json. The bad-input tests would otherwise spend most of their
time importing JAX and TensorFlow once per case.
"""

import json
import os
import sys
import traceback


def run_case(argv: list, out_path: str, err_path: str) -> int:
    pid = os.fork()
    if pid:
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    code = 1
    try:
        for fd, path in ((1, out_path), (2, err_path)):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        import eb_jax.main

        sys.argv = ["eb_jax.main", *argv]
        try:
            eb_jax.main.run()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # what the interpreter would print for an uncaught error
            traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main(cases_path: str, outdir: str) -> None:
    import eb_jax.main  # noqa: F401  the CLI and what its runs import, once
    import eb_jax.pipeline  # noqa: F401

    with open(cases_path) as f:
        cases = json.load(f)
    results = []
    for i, argv in enumerate(cases):
        out, err = os.path.join(outdir, f"{i}.out"), os.path.join(outdir, f"{i}.err")
        code = run_case(argv, out, err)
        with open(out) as f_out, open(err) as f_err:
            results.append({"returncode": code, "stdout": f_out.read(), "stderr": f_err.read()})
    with open(os.path.join(outdir, "results.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
