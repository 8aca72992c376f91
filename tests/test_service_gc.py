"""
The twistd tunnel takes the objects alive at start-up out of the garbage
collector's sight once it is ready, so full collections stay short.
"""

from __future__ import annotations

import gc

from ghosttwist.service import _freeze_startup_objects


def test_ready_tunnel_freezes_the_objects_alive_at_start_up():
    before = gc.get_freeze_count()
    try:
        result = _freeze_startup_objects("port")
        frozen = gc.get_freeze_count()
    finally:
        gc.unfreeze()

    assert result == "port"
    assert frozen > before
    assert frozen > 10_000
