"""
Summarise py-spy raw (collapsed) profiles: the functions that hold the most
samples, by self time and by inclusive time.

Usage: python benchmarks/flame.py PROFILE.txt [--top 25]
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path


def _name(frame: str) -> str:
    # "function (path/to/module.py:123)" -> "function (module.py)"
    match = re.match(r"(.*) \((.*?):\d+\)$", frame)
    if not match:
        return frame
    return f"{match.group(1)} ({Path(match.group(2)).name})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("profiles", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for path in args.profiles:
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack:
                continue
            samples = int(count)
            frames = [_name(f) for f in stack.split(";")]
            total += samples
            own[frames[-1]] += samples
            for name in set(frames):
                inclusive[name] += samples
    print(f"{total} samples")
    for title, counter in (("self", own), ("inclusive", inclusive)):
        print(f"\n{title}:")
        for name, samples in counter.most_common(args.top):
            print(f"{100 * samples / total:5.1f}%  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
