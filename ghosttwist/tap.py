"""
C{ghosttwist-tap}: write a .tap file that C{twistd -f FILE.tap} runs.

It takes exactly the flags of C{twistd ghosttwist}, checks them the same
way, and pickles the resulting application. The .tap holds configuration
only; everything with a life of its own is rebuilt when twistd starts it.
"""

from __future__ import annotations

import sys

from twisted.application import service
from twisted.persisted import sob

USAGE = "usage: ghosttwist-tap --output FILE.tap {server|client} [flags]"


def main(argv: list[str] | None = None) -> int:
    """
    Write the .tap; return the exit status.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    output, rest = _output(argv)
    if output is None:
        sys.stderr.write(f"ghosttwist-tap: error: --output is required\n{USAGE}\n")
        return 2

    from ghosttwist.cli import Options, makeService

    options = Options()
    options.parseOptions(rest)
    if options.subCommand == "dev-agent":
        sys.stderr.write("ghosttwist-tap: error: the dev agent is not saved as a .tap\n")
        return 2

    application = service.Application("ghosttwist")
    makeService(options).setServiceParent(application)
    persistable = sob.IPersistable(application)
    persistable.setStyle("pickle")
    persistable.save(filename=output)
    print(f"wrote {output}; run it with: twistd -n -f {output}")
    return 0


def _output(argv: list[str]) -> tuple[str | None, list[str]]:
    for index, word in enumerate(argv):
        if word in ("-o", "--output") and index + 1 < len(argv):
            return argv[index + 1], argv[:index] + argv[index + 2:]
        if word.startswith("--output="):
            return word.split("=", 1)[1], argv[:index] + argv[index + 1:]
    return None, argv


if __name__ == "__main__":
    sys.exit(main())
