"""FAKE of DCGM's pydcgm.py (testing/python3/pydcgm.py in NVIDIA/DCGM): like the real one it brings DcgmHandle
into its namespace (the real one also brings DcgmGroup, DcgmSystem, ..., which infertop does not use)."""

from DcgmHandle import *  # noqa: F403  # as the real pydcgm does


class DcgmException(Exception):
    pass
