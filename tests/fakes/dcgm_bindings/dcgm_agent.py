"""FAKE of DCGM's dcgm_agent.py (testing/python3/dcgm_agent.py in NVIDIA/DCGM): the functions infertop calls,
with DCGM's names, signatures, return types and errors (a DCGMError of the DCGM_ST_* code), answered from the
scripted hostengine in fake_hostengine.STATE instead of libdcgm.

What it keeps of DCGM's behaviour: dcgmConnect fails with DCGM_ST_CONNECTION_NOT_VALID where nothing listens;
dcgmEntitiesGetLatestValues never adds a watch (a field nobody watches answers DCGM_ST_NOT_WATCHED and a blank
value, DcgmCacheManager::GetLatestSample); dcgmWatchFields watches a field group on a GPU group and records it;
dcgmGetDeviceAttributes needs no watch (DCGM reads attributes live)."""

import itertools
from ctypes import c_void_p

import dcgm_fields
import dcgm_structs
import dcgmvalue
import fake_hostengine

_handles = itertools.count(1)
_groups = itertools.count(1)


def _state():
    return fake_hostengine.STATE


def _check_handle(dcgm_handle):
    value = dcgm_handle.value if isinstance(dcgm_handle, c_void_p) else dcgm_handle
    if value not in _state().open_handles:
        dcgm_structs._dcgmCheckReturn(dcgm_structs.DCGM_ST_CONNECTION_NOT_VALID)


def dcgmInit():
    if dcgm_structs.dcgmLib is None:
        dcgm_structs._dcgmCheckReturn(dcgm_structs.DCGM_ST_UNINITIALIZED)
    return dcgm_structs.DCGM_ST_OK


def dcgmShutdown():
    return dcgm_structs.DCGM_ST_OK


def _connect(address, params):
    state = _state()
    state.connects.append(
        {"address": address, "timeoutMs": params.timeoutMs, "persist": params.persistAfterDisconnect}
    )
    if address not in state.listening:
        dcgm_structs._dcgmCheckReturn(dcgm_structs.DCGM_ST_CONNECTION_NOT_VALID)
    handle = next(_handles)
    state.open_handles.add(handle)
    return c_void_p(handle)


def dcgmConnect_v2(ip_address, connectParams, version=dcgm_structs.c_dcgmConnectV2Params_version):
    connectParams.version = version
    address = ("unix:" if connectParams.addressIsUnixSocket else "") + ip_address
    return _connect(address, connectParams)


def dcgmConnect_v3(connection_string, connectParams, version=dcgm_structs.c_dcgmConnectV3Params_version):
    connectParams.version = version
    address = connection_string.replace("tcp://", "", 1).replace("unix://", "unix:", 1)
    return _connect(address, connectParams)


def dcgmDisconnect(dcgm_handle):
    _check_handle(dcgm_handle)
    state = _state()
    value = dcgm_handle.value
    state.open_handles.discard(value)
    # Without persistAfterDisconnect, DCGM drops the watches and field groups of the connection.
    for group_id in [g for g, (_, _, owner) in _owned_groups().items() if owner == value]:
        state.field_groups.pop(group_id, None)
    state.watches[:] = [w for w in state.watches if w["handle"] != value]
    return dcgm_structs.DCGM_ST_OK


def _owned_groups():
    return {g: (name, ids, owner) for g, (name, ids, owner) in _state().field_groups.items()}


def dcgmGetAllSupportedDevices(dcgm_handle):
    _check_handle(dcgm_handle)
    return [gpu.gpu_id for gpu in _state().gpus]


def dcgmGetDeviceAttributes(dcgm_handle, gpuId, version=dcgm_structs.dcgmDeviceAttributes_version3):
    _check_handle(dcgm_handle)
    for gpu in _state().gpus:
        if gpu.gpu_id == gpuId:
            attrs = dcgm_structs.c_dcgmDeviceAttributes_v3()
            attrs.version = version
            attrs.identifiers.uuid = gpu.uuid.encode()
            return attrs
    return dcgm_structs._dcgmCheckReturn(dcgm_structs.DCGM_ST_BADPARAM)


def _watched(field_id):
    state = _state()
    return field_id in state.watched or any(field_id in w["fieldIds"] for w in state.watches)


def dcgmEntitiesGetLatestValues(dcgmHandle, entities, fieldIds, flags):
    _check_handle(dcgmHandle)
    state = _state()
    state.latest_value_calls += 1
    if state.drop_connection_after is not None and state.latest_value_calls > state.drop_connection_after:
        state.open_handles.clear()
        dcgm_structs._dcgmCheckReturn(dcgm_structs.DCGM_ST_CONNECTION_NOT_VALID)
    by_id = {gpu.gpu_id: gpu for gpu in state.gpus}
    field_values = (dcgm_structs.c_dcgmFieldValue_v2 * (len(fieldIds) * len(entities)))()
    for i, (entity, field_id) in enumerate((e, f) for e in entities for f in fieldIds):
        fv = field_values[i]
        fv.version = dcgm_structs.dcgmFieldValue_version2
        fv.entityGroupId = entity.entityGroupId
        fv.entityId = entity.entityId
        fv.fieldId = field_id
        kind = dcgm_fields.FIELD_TYPES.get(field_id, dcgm_fields.DCGM_FT_DOUBLE)
        fv.fieldType = ord(kind)
        gpu = by_id.get(entity.entityId)
        status = dcgm_structs.DCGM_ST_OK
        if gpu is None or entity.entityGroupId != dcgm_fields.DCGM_FE_GPU:
            status = dcgm_structs.DCGM_ST_BADPARAM
        elif field_id in gpu.statuses:
            status = gpu.statuses[field_id]
        elif not _watched(field_id):
            status = dcgm_structs.DCGM_ST_NOT_WATCHED
        elif field_id not in gpu.values:
            status = dcgm_structs.DCGM_ST_NO_DATA
        fv.status = status
        if status == dcgm_structs.DCGM_ST_OK:
            value, ts = gpu.values[field_id]
            fv.ts = ts
            if kind == dcgm_fields.DCGM_FT_DOUBLE:
                fv.value.dbl = value
            else:
                fv.value.i64 = value
        elif kind == dcgm_fields.DCGM_FT_DOUBLE:
            fv.value.dbl = dcgmvalue.DCGM_FP64_BLANK
        else:
            fv.value.i64 = dcgmvalue.DCGM_INT64_BLANK
    return field_values


def dcgmFieldGroupCreate(dcgm_handle, fieldIds, fieldGroupName):
    _check_handle(dcgm_handle)
    state = _state()
    if any(name == fieldGroupName for name, _, _ in state.field_groups.values()):
        dcgm_structs._dcgmCheckReturn(dcgm_structs.DCGM_ST_DUPLICATE_KEY)
    group_id = next(_groups)
    state.field_groups[group_id] = (fieldGroupName, list(fieldIds), dcgm_handle.value)
    return c_void_p(group_id)


def dcgmFieldGroupDestroy(dcgm_handle, fieldGroupId):
    _check_handle(dcgm_handle)
    state = _state()
    if state.field_groups.pop(fieldGroupId.value, None) is None:
        dcgm_structs._dcgmCheckReturn(dcgm_structs.DCGM_ST_NO_DATA)
    state.destroyed_groups.append(fieldGroupId.value)
    state.watches[:] = [w for w in state.watches if w["fieldGroupId"] != fieldGroupId.value]
    return dcgm_structs.DCGM_ST_OK


def dcgmWatchFields(dcgm_handle, groupId, fieldGroupId, updateFreq, maxKeepAge, maxKeepSamples):
    _check_handle(dcgm_handle)
    state = _state()
    group = state.field_groups.get(fieldGroupId.value)
    if group is None:
        dcgm_structs._dcgmCheckReturn(dcgm_structs.DCGM_ST_NOT_CONFIGURED)
    _, field_ids, _ = group
    if state.refuse_watch.intersection(field_ids):
        dcgm_structs._dcgmCheckReturn(dcgm_structs.DCGM_ST_PROFILING_MULTI_PASS)
    state.watches.append(
        {
            "handle": dcgm_handle.value,
            "groupId": groupId,
            "fieldGroupId": fieldGroupId.value,
            "fieldIds": list(field_ids),
            "updateFreq": updateFreq,
            "maxKeepAge": maxKeepAge,
            "maxKeepSamples": maxKeepSamples,
        }
    )
    return dcgm_structs.DCGM_ST_OK


def dcgmUnwatchFields(dcgm_handle, groupId, fieldGroupId):
    _check_handle(dcgm_handle)
    state = _state()
    state.watches[:] = [w for w in state.watches if w["fieldGroupId"] != fieldGroupId.value]
    return dcgm_structs.DCGM_ST_OK
