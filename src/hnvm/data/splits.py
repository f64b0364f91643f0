"""Train/valid/test splits and evaluation targets (docs/design.md, "Data preparation")."""

from __future__ import annotations

import numpy as np
import polars as pl

from hnvm.data.sessions import run_ends, run_length, run_position, run_starts

SPLITS = ("train", "valid", "test")
# --split values: whole-session splits hold out sessions, held-out-item splits single items
WHOLE_SESSION_SPLITS = ("user-last", "time")
HELD_OUT_ITEM_SPLITS = ("leave-one-out", "shan")
NO_SESSION_TASK = ("the next-session task needs a whole-session split (user-last or time); this data set "
                   "holds out single items (leave-one-out or shan)")
SPLIT_DTYPE = pl.Enum(list(SPLITS))


def _split_of(test: pl.Expr, valid: pl.Expr) -> pl.Expr:
    return (
        pl.when(test).then(pl.lit("test", dtype=SPLIT_DTYPE))
        .when(valid).then(pl.lit("valid", dtype=SPLIT_DTYPE))
        .otherwise(pl.lit("train", dtype=SPLIT_DTYPE))
    )


def split_user_last(df: pl.DataFrame) -> pl.DataFrame:
    """Test = each user's last session, valid = the one before, train = the rest: HRNN's protocol
    and the paper's next-*session* protocol (§5.4). The paper's next-item protocol (§4.2, Table 1)
    is different: it holds out only the last item of each user's last session (`split_leave_one_out`).

    `df` is sessionize's layout: each user, and each session, a contiguous run of rows, the
    sessions of a user in time order. Adds `split` (Enum train|valid|test).
    """
    k = run_starts("sess").cast(pl.Int64).cum_sum()  # running session number
    back = pl.when(run_ends("user")).then(k).backward_fill() - k + 1  # 1 = the user's last
    return df.with_columns(split=_split_of(back == 1, back == 2))


def split_leave_one_out(df: pl.DataFrame) -> pl.DataFrame:
    """The paper's next-item protocol (§4.2, Table 1), "leave-one-out": each user's last event
    (the last item of the last session) is the test target, the event before it the validation
    target, every other event is training data. The held-out items stay in their session, after
    its training events, so a target is predicted from the user's earlier sessions and the prefix
    of its own session. Adds `split` (Enum train|valid|test) per event."""
    back = pl.int_range(pl.len(), dtype=pl.Int64)
    end = pl.when(run_ends("user")).then(back).backward_fill()
    from_end = end - back + 1  # 1 = the user's last event
    return df.with_columns(split=_split_of(from_end == 1, from_end == 2))


def split_shan(
    df: pl.DataFrame, *, test_fraction: float = 0.2, valid_fraction: float = 0.1,
    holdout_days: float = 30.0, seed: int = 0,
) -> pl.DataFrame:
    """The IJC protocol of the paper (§4.2: "as in [39]", Ying et al., IJCAI 2018, SHAN): a random
    `test_fraction` of the sessions that start in the last `holdout_days` days of the log are
    test sessions; in each, one random item is held out as the target, to be predicted from the
    user's earlier sessions and the other items of its session. A random `valid_fraction` of the
    same sessions (not test) is held out the same way for validation (our choice: SHAN names no
    validation set). The held-out item is moved to the end of its session (SHAN's short-term set
    is the session's other items, an unordered set; a sequence model reads them as the prefix)
    and the other items of the session are training events, as in the paper's RSC protocol
    (SHAN did not train on them). Sessions of a user after their test session stay training
    data (SHAN's random choice of test sessions, not a temporal cut). Needs a time column. Adds
    `split` per event."""
    rng = np.random.default_rng(seed)
    first = run_starts("sess")
    starts = df.select(pl.col("ts").filter(first)).to_series().to_numpy()
    lengths = df.select(run_length("sess").filter(first)).to_series().to_numpy()
    last = df.select(pl.col("ts").max()).item() if df.height else 0  # the log's last event
    recent = np.flatnonzero(starts >= last - holdout_days * 86400)
    chosen = rng.permutation(recent)
    n_test = round(test_fraction * len(recent))
    n_valid = round(valid_fraction * len(recent))
    code = np.zeros(len(starts), dtype=np.int8)  # 0 train, 1 valid, 2 test (per session)
    code[chosen[:n_test]] = 2
    code[chosen[n_test:n_test + n_valid]] = 1
    held = np.where(code > 0, (rng.random(len(starts)) * lengths).astype(np.int64), -1)
    k = df.select(first.cast(pl.Int64).cum_sum() - 1).to_series().to_numpy()  # session of each row
    df = df.with_columns(_code=pl.Series(code[k]), _held=pl.Series(held[k]), _k=pl.Series(k),
                         _pos=run_position("sess"))
    is_held = pl.col("_pos") == pl.col("_held")
    split = (pl.when(is_held & (pl.col("_code") == 2)).then(pl.lit("test", dtype=SPLIT_DTYPE))
             .when(is_held & (pl.col("_code") == 1)).then(pl.lit("valid", dtype=SPLIT_DTYPE))
             .otherwise(pl.lit("train", dtype=SPLIT_DTYPE)))
    # the held-out item last in its session: a stable sort on (session number, is held out)
    return (df.with_columns(split=split, _last=is_held)
            .sort("_k", "_last", maintain_order=True)
            .drop("_code", "_held", "_pos", "_k", "_last"))


def split_time(
    df: pl.DataFrame, valid_fraction: float = 0.1, test_fraction: float = 0.1
) -> pl.DataFrame:
    """A global cut-off in time: no event of train is later than any cut-off (no cross-user
    leakage). Sessions are assigned by their *end* time: the last `test_fraction` of session
    ends goes to test, the `valid_fraction` before it to valid.

    `df` is sessionize's layout (sessions contiguous, time-ordered inside), so a session's end
    is its last row. Adds `split` (Enum train|valid|test)."""
    last = run_ends("sess")
    ends = df.select(pl.col("ts").filter(last)).to_series()
    t_test = ends.quantile(1.0 - test_fraction, "lower")
    t_valid = ends.quantile(1.0 - test_fraction - valid_fraction, "lower")
    end = pl.when(last).then(pl.col("ts")).backward_fill()
    return df.with_columns(split=_split_of(end > t_test, end > t_valid))


def clean_eval_sessions(
    df: pl.DataFrame, min_session_length: int = 2, *, held_out_items: bool = False
) -> pl.DataFrame:
    """Remove valid/test events whose item is unseen in train, then (whole-session splits)
    valid/test sessions left with fewer than `min_session_length` events (sessions stay
    contiguous). Under a held-out-item split only the cold held-out items go: their sessions
    hold training events."""
    is_train = pl.col("split") == "train"
    train_items = df.select(pl.col("item").filter(is_train).unique()).to_series()
    known = is_train | pl.col("item").is_in(train_items.implode())
    mask = df.select(known).to_series()
    if not mask.all():  # filtering copies every column: only when something goes
        df = df.filter(mask)
    if min_session_length > 1 and not held_out_items:
        mask = df.select(is_train | (run_length("sess") >= min_session_length)).to_series()
        if not mask.all():
            df = df.filter(mask)
    return df.with_columns(pos=run_position("sess"))


def has_held_out_items(events: pl.DataFrame) -> bool:
    """Whether some session mixes splits: the mark of a held-out-item split (leave-one-out,
    shan) when the data set's metadata does not say."""
    return bool(events.select((pl.col("split").n_unique().over("session") > 1).any()).item())


def next_item_targets(
    events: pl.DataFrame, split: str = "test", include_first: bool = False,
    held_out_items: bool | None = None,
) -> pl.DataFrame:
    """One row per target: (user, session, pos, item). Position t (0-based here) is predicted
    from the user's earlier sessions and items 0..t-1 of its own session.

    Whole-session splits (user-last, time): every position t >= 1 of a held-out session
    (positions >= 2 in 1-based terms: our choice, position 1 would be a next-session
    prediction); `include_first` adds position 1 (the paper's Fig. 2 "Begin = the first 2
    interactions" suggests it scored it). Held-out-item splits (leave-one-out, shan;
    `held_out_items`, None = `has_held_out_items(events)`): every held-out item, at whatever
    position (position 1 included: it is the protocol's target)."""
    if held_out_items is None:
        held_out_items = has_held_out_items(events)
    sel = events.filter(pl.col("split") == split)
    if not include_first and not held_out_items:
        sel = sel.filter(pl.col("pos") >= 1)
    return sel.select("user", "session", "pos", "item").sort("session", "pos")


def next_session_targets(
    events: pl.DataFrame, split: str = "test", held_out_items: bool | None = None
) -> pl.DataFrame:
    """One row per (user, session) of the split: the set of items of that whole session,
    predicted from earlier sessions only. A held-out-item split has no held-out sessions:
    ValueError."""
    if has_held_out_items(events) if held_out_items is None else held_out_items:
        raise ValueError(NO_SESSION_TASK)
    return (
        events.filter(pl.col("split") == split)
        .group_by("user", "session", maintain_order=True)
        .agg(pl.col("item").unique(maintain_order=True).alias("items"))
        .sort("session")
    )
