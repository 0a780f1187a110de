"""Loopback addresses for the tests: free TCP ports, and multicast groups from one seeded RNG.

Tests that run at once (or one after another, with a cast still winding down) must not share
a group and port. Each draws its own from :data:`RNG`, seeded once per pytest process: from
``BOOMSCOOTER_TEST_GROUP_SEED`` when set, else at random. The seed is printed in pytest's
header, and a failing test's report lists the groups it was given (``conftest.py``), so a
collision can be told from a bug and a run replays with the same groups (same seed, same
test order: pytest-randomly's seed is printed too).

Third octet 66 is kept clear: bootcast's default group is 239.255.66.1.
"""

from __future__ import annotations

import os
import random
import socket

SEED = int(os.environ.get("BOOMSCOOTER_TEST_GROUP_SEED") or random.SystemRandom().getrandbits(32))
RNG = random.Random(SEED)
handed_out: list[str] = []
"""Every group (``group:port``, or a base group and port base) drawn so far, in order."""


def free_port() -> int:
    """A TCP port nothing listens on now (bound and released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _third_octet() -> int:
    return RNG.choice([n for n in range(1, 255) if n != 66])


def random_group() -> str:
    """``239.255.X.Y:PORT`` on loopback, unlikely to collide with another test's."""
    group = f"239.255.{_third_octet()}.{RNG.randrange(2, 254)}:{RNG.randrange(20000, 60000)}"
    handed_out.append(group)
    return group


def group_slot() -> tuple[str, int]:
    """A base group ``239.255.X.1`` and a port base for a bootcast server's casts."""
    group, port_base = f"239.255.{_third_octet()}.1", RNG.randrange(30000, 60000)
    handed_out.append(f"{group} ports from {port_base}")
    return group, port_base
