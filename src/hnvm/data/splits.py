"""Train/valid/test splits and evaluation targets (docs/design.md, "Data preparation")."""

from __future__ import annotations

import polars as pl

from hnvm.data.sessions import run_ends, run_length, run_position, run_starts

SPLITS = ("train", "valid", "test")
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
    is different: it holds out only the last item of each user's last session (leave-one-out).

    `df` is sessionize's layout: each user, and each session, a contiguous run of rows, the
    sessions of a user in time order. Adds `split` (Enum train|valid|test).
    """
    k = run_starts("sess").cast(pl.Int64).cum_sum()  # running session number
    back = pl.when(run_ends("user")).then(k).backward_fill() - k + 1  # 1 = the user's last
    return df.with_columns(split=_split_of(back == 1, back == 2))


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


def clean_eval_sessions(df: pl.DataFrame, min_session_length: int = 2) -> pl.DataFrame:
    """Remove valid/test events whose item is unseen in train, then valid/test sessions that
    are left with fewer than `min_session_length` events (sessions stay contiguous)."""
    is_train = pl.col("split") == "train"
    train_items = df.select(pl.col("item").filter(is_train).unique()).to_series()
    known = is_train | pl.col("item").is_in(train_items.implode())
    mask = df.select(known).to_series()
    if not mask.all():  # filtering copies every column: only when something goes
        df = df.filter(mask)
    if min_session_length > 1:
        mask = df.select(is_train | (run_length("sess") >= min_session_length)).to_series()
        if not mask.all():
            df = df.filter(mask)
    return df.with_columns(pos=run_position("sess"))


def next_item_targets(
    events: pl.DataFrame, split: str = "test", include_first: bool = False
) -> pl.DataFrame:
    """One row per target: (user, session, pos, item). Position t (0-based here) is predicted
    from the user's earlier sessions and items 0..t-1 of its own session. By default t >= 1
    (positions >= 2 in 1-based terms: our choice for the user-last protocol, where position 1
    would be a next-session prediction; the paper does not say, and its Fig. 2 "Begin = the first
    2 interactions" suggests it scored position 1 too, which `include_first` does)."""
    sel = events.filter(pl.col("split") == split)
    if not include_first:
        sel = sel.filter(pl.col("pos") >= 1)
    return sel.select("user", "session", "pos", "item").sort("session", "pos")


def next_session_targets(events: pl.DataFrame, split: str = "test") -> pl.DataFrame:
    """One row per (user, session) of the split: the set of items of that whole session,
    predicted from earlier sessions only."""
    return (
        events.filter(pl.col("split") == split)
        .group_by("user", "session", maintain_order=True)
        .agg(pl.col("item").unique(maintain_order=True).alias("items"))
        .sort("session")
    )
