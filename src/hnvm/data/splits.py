"""Train/valid/test splits and evaluation targets (DESIGN §4)."""

from __future__ import annotations

import polars as pl

SPLITS = ("train", "valid", "test")


def split_user_last(df: pl.DataFrame) -> pl.DataFrame:
    """Test = each user's last session, valid = the one before, train = the rest (paper, HRNN).

    `df` has user, sess (ordered by time within user), item, pos. Adds `split`.
    """
    order = (
        df.select("user", "sess").unique()
        .with_columns(back=pl.col("sess").rank("dense", descending=True).over("user"))
    )
    split = (
        pl.when(pl.col("back") == 1).then(pl.lit("test"))
        .when(pl.col("back") == 2).then(pl.lit("valid"))
        .otherwise(pl.lit("train"))
    )
    order = order.select("sess", split=split)
    return df.join(order, on="sess", how="left")


def split_time(df: pl.DataFrame, valid_fraction: float = 0.1, test_fraction: float = 0.1) -> pl.DataFrame:
    """A global cut-off in time: no event of train is later than any cut-off (no cross-user
    leakage). Sessions are assigned by their *end* time: the last `test_fraction` of session
    ends goes to test, the `valid_fraction` before it to valid."""
    ends = df.group_by("sess").agg(pl.col("ts").max().alias("end"))
    t_test = ends.get_column("end").quantile(1.0 - test_fraction, "lower")
    t_valid = ends.get_column("end").quantile(1.0 - test_fraction - valid_fraction, "lower")
    split = (
        pl.when(pl.col("end") > t_test).then(pl.lit("test"))
        .when(pl.col("end") > t_valid).then(pl.lit("valid"))
        .otherwise(pl.lit("train"))
    )
    return df.join(ends.select("sess", split=split), on="sess", how="left")


def clean_eval_sessions(df: pl.DataFrame, min_session_length: int = 2) -> pl.DataFrame:
    """Remove valid/test events whose item is unseen in train, then valid/test sessions that
    are left with fewer than `min_session_length` events."""
    train_items = df.filter(pl.col("split") == "train").select("item").unique()
    is_train = pl.col("split") == "train"
    known = df.join(train_items.with_columns(_k=pl.lit(True)), on="item", how="left")
    known = known.filter(is_train | pl.col("_k").is_not_null()).drop("_k")
    known = known.filter(is_train | (pl.len().over("sess") >= min_session_length))
    return known.with_columns(pos=pl.int_range(pl.len(), dtype=pl.Int32).over("sess"))


def next_item_targets(events: pl.DataFrame, split: str = "test", include_first: bool = False) -> pl.DataFrame:
    """One row per target: (user, session, pos, item). Position t (0-based here) is predicted
    from the user's earlier sessions and items 0..t-1 of its own session. By default t >= 1
    (the paper's positions >= 2 in 1-based terms)."""
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
