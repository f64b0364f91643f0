"""The request and response models of `hnvm serve` (pydantic, strict), and its size limits.

Ids are opaque text (`Id`): an integer id becomes its decimal text, anything else non-text is
refused. Timestamps are seconds (`Timestamp`), |ts| <= 1e11. `Limits` bounds what one request may
carry; FastAPI publishes these models as the OpenAPI schema (/docs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints


@dataclass(frozen=True)
class Limits:
    max_events: int = 10_000  # events per POST /v1/events
    max_session_length: int = 1000  # events of one session (stored or in a recommend request)
    max_k: int = 1000
    max_body_bytes: int = 16 << 20
    max_id_length: int = 256


LIMITS = Limits()


def _int_to_str(v: Any) -> Any:
    # Ids are opaque text. JSON clients often send integer ids: an integer becomes its decimal
    # text, which is exactly how JSON wrote it (JSON has no leading zeros), so 7 is "7" and never
    # "007" or "7.0". Floats and booleans are refused (strict mode): their text is not the id.
    return str(v) if isinstance(v, int) and not isinstance(v, bool) else v


Id = Annotated[str, StringConstraints(min_length=1, max_length=LIMITS.max_id_length), BeforeValidator(_int_to_str)]
# Unix seconds reach 1e11 only in the year 5138: a larger |ts| is another unit (ms) or garbage, and one
# stored event that far ahead would keep its user's session open for ever. (Clocks ahead of the server's
# are allowed: replays and tests freeze time that way.)
MAX_TS = 1e11
Timestamp = Annotated[float, Field(allow_inf_nan=False, ge=-MAX_TS, le=MAX_TS,
                                   description="seconds (Unix time or the dataset's clock), |ts| <= 1e11")]


class EventIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    user: Id
    item: Id
    ts: Timestamp | None = Field(None, description="event time; default: arrival time")
    session: Id | None = Field(None, description="explicit session key (e.g. an order id): the user's "
                               "consecutive events with one key are one session, however far apart in "
                               "time; a key whose session a later event closed cannot come back (409: "
                               "keyed sessions must not interleave). Without keys, sessions close after "
                               "the idle gap")


class EventsIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    events: list[EventIn] = Field(min_length=1, description=f"at most {LIMITS.max_events} (`Limits`) per request")


class EventsOut(BaseModel):
    accepted: int
    first_seq: int
    last_seq: int
    unknown_items: list[str] = Field(description="items the model does not know (logged, ignored)")


class RecommendIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    user: Id
    session: list[Id] = Field(default_factory=list, description="items to add to the user's open session for "
                              f"this request only (at most {LIMITS.max_session_length} in the request: 413; "
                              f"at most {LIMITS.max_session_length} together with the events of the open "
                              "session: 422)")
    k: int = Field(10, ge=1, le=LIMITS.max_k)
    exclude_seen: bool = Field(False, description="leave out items the user has interacted with")
    ts: Timestamp | None = Field(None, description="request time (an open session idle for longer "
                                 "than the gap is treated as closed); default: now")


class ScoredItem(BaseModel):
    item: str
    score: float


class RecommendOut(BaseModel):
    user: str
    items: list[ScoredItem]
    unknown_items: list[str]
    cold_start: bool
    session_length: int
    new_session: bool
    model: str
