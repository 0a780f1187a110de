"""Defaults shared by the server and the command line (kept import-light)."""

DEFAULT_GROUP_V4 = "239.255.66.1"
DEFAULT_GROUP_V6 = "ff15::b007:1"
DEFAULT_PORT_BASE = 27000
DEFAULT_PAGE_SIZE = 1400  # 1400 + 16 + 4 + IPv6/UDP 48 < 1500: no fragmentation
DEFAULT_RATE_MBIT = 900.0
DEFAULT_IDLE_LOOPS = 10
