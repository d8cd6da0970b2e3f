"""`labkit doctor` and `labkit cleanup`: the course's own commands."""

from __future__ import annotations

import argparse


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    if command == "cleanup":
        parser.description = (
            "Remove every mount, cgroup, network namespace, link, loop device and process that "
            "labkit made (found by its naming rules), and nothing else. Images stay."
        )


def run(command: str, args: argparse.Namespace) -> int:
    if command == "doctor":
        from labkit.lab import doctor

        return doctor.main()
    from labkit.lab import cleanup

    return cleanup.main()
