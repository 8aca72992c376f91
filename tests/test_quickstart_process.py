"""
The README's quickstart command, run as a newcomer would (with other ports,
so it cannot collide with anything else on the machine).
"""

from __future__ import annotations

import subprocess

from tests.processes import REPOSITORY, environment, free_port


def test_quickstart_check_crosses_the_whole_tunnel(tmp_path):
    """
    scripts/quickstart --check installs, starts the dev agent, backend and
    both tunnels, and gets the backend's page through them with curl.
    """
    env = environment(
        BACKEND_PORT=str(free_port()),
        SERVER_PORT=str(free_port()),
        CLIENT_PORT=str(free_port()),
        RUN_DIR=str(tmp_path),
    )

    result = subprocess.run(
        ["bash", str(REPOSITORY / "scripts" / "quickstart"), "--check"],
        capture_output=True, text=True, timeout=600, env=env, cwd=REPOSITORY,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "Directory listing for /" in result.stdout
    assert "client spiffe://domain.test/frontend allowed" in result.stdout
