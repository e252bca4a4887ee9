"""FAKE of DCGM's DcgmHandle.py (testing/python3/DcgmHandle.py in NVIDIA/DCGM 4.6): the constructor's arguments
and the way it connects (dcgm_structs._dcgmInit, dcgm_agent.dcgmInit, dcgmConnect_v3 to "tcp://ADDRESS" or
"unix://PATH" with timeoutMs and persistAfterDisconnect), ``handle``, ``Shutdown()``. No embedded hostengine."""

import contextlib

import dcgm_agent
import dcgm_structs


class DcgmHandle:
    def __init__(
        self,
        handle=None,
        ipAddress=None,
        opMode=dcgm_structs.DCGM_OPERATION_MODE_AUTO,
        persistAfterDisconnect=False,
        unixSocketPath=None,
        timeoutMs=0,
        decoratorHandle=None,
    ):
        self._handleCreated = False
        if handle is not None:
            self.handle = handle
            return
        if ipAddress is not None and unixSocketPath is not None:
            raise dcgm_structs.dcgmExceptionClass(dcgm_structs.DCGM_ST_BADPARAM)
        dcgm_structs._dcgmInit()
        dcgm_agent.dcgmInit()
        if ipAddress is None and unixSocketPath is None:
            raise dcgm_structs.dcgmExceptionClass(dcgm_structs.DCGM_ST_NOT_SUPPORTED)  # embedded: not faked
        connectParams = dcgm_structs.c_dcgmConnectV3Params_v1()
        connectParams.version = dcgm_structs.c_dcgmConnectV3Params_version
        connectParams.timeoutMs = timeoutMs
        connectParams.persistAfterDisconnect = 1 if persistAfterDisconnect else 0
        address = "tcp://" + ipAddress if ipAddress is not None else "unix://" + unixSocketPath
        self.handle = dcgm_agent.dcgmConnect_v3(address, connectParams)
        self.isEmbedded = False
        self._handleCreated = True

    def __del__(self):
        if self._handleCreated:
            self.Shutdown()

    def Shutdown(self):
        if not self._handleCreated:
            return
        with contextlib.suppress(dcgm_structs.DCGMError):
            dcgm_agent.dcgmDisconnect(self.handle)
        self._handleCreated = False
        self.handle = None
