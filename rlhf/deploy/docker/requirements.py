"""Print the requirements pyproject.toml declares, one per line, for the Docker build and its wheelhouse.

    python requirements.py pyproject.toml --torch              # the torch pin alone, e.g. torch==2.13.0
    python requirements.py pyproject.toml --extra test          # build-system requires + dependencies + extras, torch left out
    python requirements.py pyproject.toml --extra test --all    # the same with the torch pin (the wheelhouse)

The image installs the dependencies before it copies the source (one cached layer that only
pyproject.toml invalidates) and then the project itself with --no-deps --no-build-isolation, so
the build backend (setuptools) is listed here too. Standard library only: it runs in the bare
base image, before anything is installed.
"""
import argparse
import sys
import tomllib


def is_torch(req: str) -> bool:
    return req.replace(" ", "").lower().startswith("torch==")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pyproject")
    p.add_argument("--torch", action="store_true", help="print only the torch pin")
    p.add_argument("--extra", action="append", default=[], help="optional-dependencies group to add")
    p.add_argument("--all", action="store_true", help="keep the torch pin in the full list")
    args = p.parse_args(argv)

    with open(args.pyproject, "rb") as f:
        data = tomllib.load(f)
    deps = data["project"]["dependencies"]
    torch = [d for d in deps if is_torch(d)]
    if len(torch) != 1:
        print(f"error: expected one exact torch pin (torch==X) in {args.pyproject}, found {torch}", file=sys.stderr)
        return 1
    if args.torch:
        print(torch[0])
        return 0
    extras = data["project"].get("optional-dependencies", {})
    unknown = [e for e in args.extra if e not in extras]
    if unknown:
        print(f"error: unknown extra(s) {unknown}; pyproject has {sorted(extras)}", file=sys.stderr)
        return 1
    reqs = list(data["build-system"]["requires"]) + deps + [r for e in args.extra for r in extras[e]]
    for r in reqs:
        if args.all or not is_torch(r):
            print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
