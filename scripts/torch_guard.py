"""Keep an installed torch when installing spsr-hpc (standard library only; run it with the venv's python).

spsr-hpc asks for ``torch>=2.11`` and leaves the build to you, but pip's resolver prefers the
newest torchvision, which pins the newest torch: without a constraint, ``pip install .`` in a
venv holding your own torch plans to replace it (and to pull another CUDA wheel stack).

    python scripts/torch_guard.py constraints > torch-constraints.txt   # pins what is installed
    pip install -c torch-constraints.txt -e .                            # torch stays as it is
    pip install --dry-run --report plan.json -c torch-constraints.txt -e .
    python scripts/torch_guard.py check plan.json                        # exit 1 if torch would change

``constraints`` prints ``name==version`` for each of torch, torchvision, torchaudio and triton
that is installed (local labels such as ``+cu130`` kept, so only that exact build satisfies it);
it fails, naming them, when the installed ones already contradict each other (a torchvision
built for another torch), since no install could keep them.
``check`` reads a ``pip install --dry-run --report`` file and fails, naming the versions, when
the plan installs any of them while a version is already installed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys

GUARDED = ("torch", "torchvision", "torchaudio", "triton")


def installed_versions() -> dict[str, str]:
    """Installed versions of the guarded packages in this interpreter's environment."""
    found = {}
    for name in GUARDED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def _requirement_parser():
    try:
        from packaging.requirements import Requirement
    except ImportError:  # every venv with pip has a copy
        from pip._vendor.packaging.requirements import Requirement
    return Requirement


def conflicts(versions: dict[str, str]) -> list[str]:
    """Requirements among the installed guarded packages that the installed versions break,
    e.g. ``torchvision 0.29.1 needs torch==2.14.1, installed 2.13.0+cpu`` (no pin can keep both)."""
    Requirement = _requirement_parser()
    found = []
    for name in versions:
        for line in importlib.metadata.requires(name) or []:
            req = Requirement(line)
            other = req.name.lower()
            applies = req.marker is None or req.marker.evaluate({"extra": ""})
            if (other in versions and other != name and applies
                    and not req.specifier.contains(versions[other], prereleases=True)):
                found.append(f"{name} {versions[name]} needs {req.name}{req.specifier}, "
                             f"installed {versions[other]}")
    return found


def constraint_lines(versions: dict[str, str]) -> list[str]:
    return [f"{name}=={version}" for name, version in versions.items()]


def planned_changes(report: dict, versions: dict[str, str]) -> list[str]:
    """``name: installed -> planned`` for each guarded, installed package the plan would replace."""
    changes = []
    for item in report.get("install", []):
        meta = item.get("metadata", {})
        name = str(meta.get("name", "")).lower().replace("_", "-")
        if name in versions:
            changes.append(f"{name}: installed {versions[name]} -> planned {meta.get('version')}")
    return changes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("constraints", help="print name==version pins of the installed torch stack")
    c = sub.add_parser("check", help="fail when a pip --dry-run --report plan replaces the installed torch")
    c.add_argument("report", help="the JSON file written by pip install --dry-run --report FILE")
    args = p.parse_args(argv)
    versions = installed_versions()
    if args.cmd == "constraints":
        broken = conflicts(versions)
        if broken:
            print("error: the installed torch stack does not fit together, so no install can keep it:\n  "
                  + "\n  ".join(broken)
                  + "\nInstall the torchvision (and triton) built for your torch first, or set "
                  "SPSR_ALLOW_TORCH_CHANGE=1 to let pip choose.", file=sys.stderr)
            return 1
        print("\n".join(constraint_lines(versions)))
        return 0
    with open(args.report) as f:
        report = json.load(f)
    changes = planned_changes(report, versions)
    if changes:
        print(
            "error: installing spsr-hpc would replace the torch stack of this environment:\n  "
            + "\n  ".join(changes)
            + "\nPin it with a constraints file (python scripts/torch_guard.py constraints > c.txt; "
            "pip install -c c.txt ...), or set SPSR_ALLOW_TORCH_CHANGE=1 if the change is wanted.",
            file=sys.stderr,
        )
        return 1
    planned = [f"{i['metadata']['name']} {i['metadata']['version']}" for i in report.get("install", [])
               if str(i.get("metadata", {}).get("name", "")).lower() in GUARDED]
    if planned:
        print(f"[torch_guard] torch stack kept; new: {', '.join(planned)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
