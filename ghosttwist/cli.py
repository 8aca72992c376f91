"""
The command line: twistd's C{ghosttwist} plugin and its sub-commands.

Every mistake a user can make on the command line ends here in one line on
standard error and exit status 2, before anything listens; twistd's own
habit of printing its whole help text first is bypassed on purpose.
"""

from __future__ import annotations

import sys

from twisted.application.service import IService
from twisted.python import usage

from ghosttwist._version import __version__


def _server_options() -> usage.Options:
    from ghosttwist.options import ServerOptions

    return ServerOptions()


def _client_options() -> usage.Options:
    from ghosttwist.options import ClientOptions

    return ClientOptions()


def _dev_agent_options() -> usage.Options:
    from ghosttwist.devagent.options import DevAgentOptions

    return DevAgentOptions()


class Options(usage.Options):
    """
    C{twistd ghosttwist}: pick a mode.
    """

    synopsis = "{server|client|dev-agent} [options]"

    def getSynopsis(self) -> str:
        """
        Name the plugin once in a sub-command's usage line, not twice.
        """
        if self.subCommand:
            return "Usage: twistd [twistd options] ghosttwist"
        return super().getSynopsis()

    subCommands = [
        ("server", None, _server_options, "accept mutual TLS, forward plain bytes"),
        ("client", None, _client_options, "accept plain bytes, forward over mutual TLS"),
        ("dev-agent", None, _dev_agent_options, "development SPIFFE Workload API"),
    ]

    def opt_version(self) -> None:
        """
        Print the version and exit.
        """
        print(f"ghosttwist {__version__}")
        sys.exit(0)

    def parseOptions(self, options=None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as error:
            command = "ghosttwist"
            if self.subCommand:
                command = f"ghosttwist {self.subCommand}"
            sys.stderr.write(f"{command}: error: {error} (see --help)\n")
            raise SystemExit(2)

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("choose a mode: server, client or dev-agent")


def makeService(options: Options) -> IService:
    """
    Build the service for the chosen mode; called by twistd before it forks.
    """
    if options.subCommand == "dev-agent":
        from ghosttwist.devagent.service import make_dev_agent_service

        return make_dev_agent_service(options.subOptions)

    from ghosttwist.service import make_tunnel_service_for_twistd

    return make_tunnel_service_for_twistd(options.subOptions)
