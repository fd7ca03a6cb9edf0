"""CTest's entry to the pytest suite (the test Python.pytest).

PyTorch and pytest are test-only dependencies, so a build may find them
missing. Then this exits 77, which CTest reports as skipped, and says what did
not import and with which interpreter; with DSALAB_REQUIRE_PYTEST=1 (set by
scripts/test.sh, which installs both, and so by CI) it fails instead, so a CI
run can never pass without the Python suite.
"""
import os
import sys


def main() -> int:
    missing = []
    for mod in ("pytest", "torch"):
        try:
            __import__(mod)
        except Exception as e:  # an import can fail with more than ImportError (a broken wheel's OSError)
            missing.append(f"  import {mod}: {type(e).__name__}: {e}")
    if missing:
        print(f"Python.pytest: the suite needs pytest and torch importable by {sys.executable} "
              f"(Python {sys.version.split()[0]}), and:", file=sys.stderr)
        print("\n".join(missing), file=sys.stderr)
        print(f"  fix: {sys.executable} -m pip install pytest torch "
              "(scripts/test.sh installs both), or configure with -DPython_EXECUTABLE=<the Python that has them>",
              file=sys.stderr)
        return 1 if os.environ.get("DSALAB_REQUIRE_PYTEST") == "1" else 77
    import pytest
    return pytest.main(["-q", "-p", "no:cacheprovider", os.path.dirname(os.path.abspath(__file__))])


if __name__ == "__main__":
    sys.exit(main())
