"""Limits of what the platform accepts, defined once: the API's bodies and query parameters
(`api/models/`, `api/routers/`) and the Temporal contracts (`fleetflow/contracts/`) both use
these constants and types, so a value the API accepts is never one a contract refuses."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, StringConstraints

# identifiers: a tenant, a device, and the short names of types, tags, metrics, campaigns, rules
TENANT_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
DEVICE_ID_MAX_CHARS = 128
DEVICE_ID_PATTERN = rf"^[A-Za-z0-9][A-Za-z0-9_.:-]{{0,{DEVICE_ID_MAX_CHARS - 1}}}$"
NAME_MAX_CHARS = 64
_NAME_TAIL = rf"{{0,{NAME_MAX_CHARS - 1}}}"
ID_PATTERN = rf"^[A-Za-z0-9][A-Za-z0-9_.:-]{_NAME_TAIL}$"

TenantId = Annotated[str, StringConstraints(pattern=TENANT_PATTERN)]
DeviceId = Annotated[str, StringConstraints(pattern=DEVICE_ID_PATTERN)]
DeviceTypeName = Annotated[str, StringConstraints(pattern=rf"^[a-z][a-z0-9_-]{_NAME_TAIL}$")]
FirmwareVersion = Annotated[str, StringConstraints(pattern=rf"^[0-9A-Za-z][0-9A-Za-z.+_-]{_NAME_TAIL}$")]
Tag = Annotated[str, StringConstraints(pattern=rf"^[A-Za-z0-9_.:=/-]{{1,{NAME_MAX_CHARS}}}$")]
Metric = Annotated[str, StringConstraints(pattern=rf"^[A-Za-z][A-Za-z0-9_.:-]{_NAME_TAIL}$")]
CampaignId = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
RuleId = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
EventTypeName = Annotated[str, StringConstraints(pattern=rf"^(\*|[A-Za-z][A-Za-z0-9_.:-]{_NAME_TAIL})$")]

# a person's short text: the reason of an approval, rejection, cancellation or retirement, a
# device's progress detail
REASON_MAX_CHARS = 500
Reason = Annotated[str, Field(max_length=REASON_MAX_CHARS)]

# a device as onboarded
MAX_TAGS = 32
MAX_METADATA_BYTES = 8192
MAX_CONFIG_BYTES = 16384
# nesting of metadata/config: a document deeper than ~250 levels cannot be serialised by
# pydantic (the route answered 500), and one deeper than ~1,000 not even measured in bytes
MAX_SPEC_DEPTH = 64
MAX_BULK_DEVICES = 10_000

# rollouts and decommissioning
MAX_TARGET_DEVICES = 100_000
MAX_TARGET_TAGS = 16
MAX_BULK_DECOMMISSION = 1000

# telemetry
MAX_BATCH_READINGS = 10_000
MAX_BATCH_BYTES = 2 * 1024 * 1024
FUTURE_TOLERANCE_S = 300
# the oldest `ts` accepted: a year back keeps a window within ~370 daily partitions and every
# timestamp far inside what Python and PostgreSQL both represent
MAX_AGE_DAYS = 366
# |value| bound: squares times any window's count stay finite, so no aggregate (sum, var_pop,
# the EWMA variance, z-scores, rates) can overflow
MAX_ABS_VALUE = 1e100
Value = Annotated[float, Field(allow_inf_nan=False, ge=-MAX_ABS_VALUE, le=MAX_ABS_VALUE)]
BatchId = Annotated[str, StringConstraints(pattern=DEVICE_ID_PATTERN)]  # a device id's shape

# a rule's parameter (a bound, a rate, a z): finite, since the JSON parsers take 1e400 (infinity),
# NaN and Infinity, which the rule's jsonb row cannot hold and a comparison never crosses
RuleParam = Annotated[float, Field(allow_inf_nan=False)]
MAX_CREDENTIAL_LIFETIME_DAYS = 3650  # a device type's credential lifetime
MAX_CREDENTIAL_OVERLAP_S = 90 * 86400  # how long a superseded credential stays valid at most
