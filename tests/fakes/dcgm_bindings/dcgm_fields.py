"""FAKE of DCGM's dcgm_fields.py (testing/python3/dcgm_fields.py in NVIDIA/DCGM): the entity groups, field types
and profiling field ids infertop uses, with DCGM's names and numbers (the pre-4.6 names; 4.6 keeps them as
aliases of DCGM_FI_PROF_*_UTIL_RATIO)."""

from ctypes import c_uint32

import dcgm_structs  # noqa: F401  # the real module imports it too

DCGM_FT_BINARY = "b"
DCGM_FT_DOUBLE = "d"
DCGM_FT_INT64 = "i"
DCGM_FT_STRING = "s"
DCGM_FT_TIMESTAMP = "t"

DCGM_FE_NONE = 0
DCGM_FE_GPU = 1
DCGM_FE_VGPU = 2
DCGM_FE_SWITCH = 3
DCGM_FE_GPU_I = 4
DCGM_FE_GPU_CI = 5

c_dcgm_field_eid_t = c_uint32

DCGM_FI_DEV_UUID = 54
DCGM_FI_PROF_GR_ENGINE_ACTIVE = 1001
DCGM_FI_PROF_SM_ACTIVE = 1002
DCGM_FI_PROF_SM_OCCUPANCY = 1003
DCGM_FI_PROF_PIPE_TENSOR_ACTIVE = 1004
DCGM_FI_PROF_DRAM_ACTIVE = 1005
DCGM_FI_PROF_PCIE_TX_BYTES = 1009
DCGM_FI_PROF_PCIE_RX_BYTES = 1010
DCGM_FI_PROF_NVLINK_TX_BYTES = 1011
DCGM_FI_PROF_NVLINK_RX_BYTES = 1012

# fieldId -> field type, as dcgmlib/src/dcgm_fields.cpp declares them: the ratios are doubles, the byte rates int64
FIELD_TYPES = {
    1001: DCGM_FT_DOUBLE,
    1002: DCGM_FT_DOUBLE,
    1003: DCGM_FT_DOUBLE,
    1004: DCGM_FT_DOUBLE,
    1005: DCGM_FT_DOUBLE,
    1009: DCGM_FT_INT64,
    1010: DCGM_FT_INT64,
    1011: DCGM_FT_INT64,
    1012: DCGM_FT_INT64,
}
