"""The synthetic log has the structure it promises; the Instacart sample is found."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from hnvm.data.samples import (
    instacart_sample_path,
    synthetic_log,
    synthetic_log_chunks,
    synthetic_truth,
    write_synthetic,
)
from hnvm.errors import ConfigError

GAP_S = 30 * 60


def sessionize(df: pl.DataFrame) -> pl.DataFrame:
    """Add `session` (global, increasing) by a 30-minute idle gap, independently of the code."""
    new = (pl.col("user_id") != pl.col("user_id").shift(1)) | (
        pl.col("timestamp") - pl.col("timestamp").shift(1) > GAP_S
    )
    return df.with_columns(session=new.fill_null(True).cast(pl.Int64).cum_sum())


def test_columns_dtypes_and_order() -> None:
    df = synthetic_log(n_users=200, n_items=500, seed=1)
    assert df.schema == pl.Schema(
        {"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Int64}
    )
    assert df.equals(df.sort("user_id", "timestamp", maintain_order=True))
    assert df["user_id"].n_unique() == 200 and df["user_id"].min() == 1
    assert df["item_id"].min() >= 1 and df["item_id"].max() <= 500
    # Timestamps strictly increase within a user: no ties for a sessionizer to break.
    d = df.select(pl.col("timestamp").diff().over("user_id").drop_nulls())
    assert (d["timestamp"] > 0).all()


def test_deterministic_and_independent_of_chunking() -> None:
    a = synthetic_log(n_users=300, seed=7)
    assert a.equals(synthetic_log(n_users=300, seed=7))
    assert not a.equals(synthetic_log(n_users=300, seed=8))
    # More users than one block: chunks in order rebuild the whole frame.
    kw = {"n_users": 9000, "n_items": 500, "sessions_per_user": (3, 4), "session_length": (2, 3)}
    whole = synthetic_log(**kw)
    chunks = list(synthetic_log_chunks(chunk_users=1, **kw))
    assert len(chunks) == 2
    assert pl.concat(chunks).equals(whole)


def test_thirty_minute_gap_recovers_sessions_exactly() -> None:
    df = sessionize(synthetic_log(n_users=300, sessions_per_user=(5, 5), session_length=(4, 4)))
    per_user = df.group_by("user_id").agg(pl.col("session").n_unique())
    assert (per_user["session"] == 5).all()
    assert (df.group_by("session").len()["len"] == 4).all()
    # With the default ranges, every gap is far from 30 minutes on either side.
    d = synthetic_log(n_users=300).select(pl.col("timestamp").diff().over("user_id"))
    gaps = d["timestamp"].drop_nulls().to_numpy()
    assert ((gaps <= 15 * 60) | (gaps >= 2 * 3600)).all()
    assert (gaps >= 2 * 3600).any() and (gaps <= 15 * 60).any()


def _topic_hist(df: pl.DataFrame, item_topic: np.ndarray, n_topics: int) -> np.ndarray:
    users = df["user_id"].to_numpy() - 1
    h = np.zeros((users.max() + 1, n_topics))
    np.add.at(h, (users, item_topic[df["item_id"].to_numpy()]), 1.0)
    return h / h.sum(axis=1, keepdims=True)


def test_user_taste_is_stable_across_sessions() -> None:
    # No drift: only the user's stable taste can link early and late sessions.
    kw = {"n_users": 400, "n_topics": 20, "seed": 3, "topic_stickiness": 0.0}
    df = sessionize(synthetic_log(**kw))
    topic = synthetic_truth(**kw).item_topic
    rank = pl.col("session").rank("dense").over("user_id")
    half = df.with_columns(late=rank > pl.col("session").n_unique().over("user_id") / 2)
    h1 = _topic_hist(half.filter(~pl.col("late")), topic, 20)
    h2 = _topic_hist(half.filter(pl.col("late")), topic, 20)
    # Histogram intersection: the topic mass a user's two halves share.
    own = np.minimum(h1, h2).sum(axis=1).mean()
    other = np.minimum(h1, np.roll(h2, 1, axis=0)).sum(axis=1).mean()
    assert own > 0.4 and own > 4 * other, (own, other)


def _same_topic_rate(stickiness: float) -> float:
    df = sessionize(
        synthetic_log(n_users=300, session_length=(4, 4), topic_stickiness=stickiness)
    )
    topic = synthetic_truth().item_topic
    s = (
        df.with_columns(topic=pl.Series(topic[df["item_id"].to_numpy()]))
        .group_by("session", maintain_order=True)
        .agg(pl.col("user_id").first(), pl.col("topic").mode().min())
    )
    same = s.select(
        (pl.col("topic") == pl.col("topic").shift(1)).over("user_id").drop_nulls()
    )["topic"]
    return float(same.mean())


def test_session_topics_drift_from_the_previous_session() -> None:
    # A sticky user repeats the previous session's topic far more often than taste alone.
    assert _same_topic_rate(0.9) > _same_topic_rate(0.0) + 0.3


def test_sequential_signal_beats_popularity() -> None:
    df = sessionize(synthetic_log(n_users=1000, seed=5))
    pairs = df.with_columns(nxt=pl.col("item_id").shift(-1).over("session")).drop_nulls("nxt")
    train = pairs.filter(pl.col("user_id") <= 500)
    test = pairs.filter(pl.col("user_id") > 500)
    bigram = (
        train.group_by("item_id", "nxt")
        .len()
        .sort("len", "nxt", descending=[True, False])
        .group_by("item_id", maintain_order=True)
        .first()
        .select("item_id", pred="nxt")
    )
    hits = test.join(bigram, on="item_id", how="left")
    acc_bigram = float((hits["pred"] == hits["nxt"]).fill_null(False).mean())
    top = train.group_by("nxt").len().sort("len", "nxt", descending=[True, False])["nxt"][0]
    acc_pop = float((test["nxt"] == top).mean())
    assert acc_bigram > 0.3 and acc_bigram > 10 * acc_pop, (acc_bigram, acc_pop)


def test_truth_is_consistent() -> None:
    t = synthetic_truth(n_items=300, n_topics=10, n_successors=4, seed=2)
    assert t.item_topic[0] == -1 and set(t.item_topic[1:]) == set(range(10))
    items = np.arange(1, 301)
    succ = t.successors[1:]
    assert (succ != items[:, None]).all()  # never the item itself
    assert (t.item_topic[succ] == t.item_topic[items][:, None]).all()  # same topic
    assert (np.sort(succ, axis=1)[:, 1:] != np.sort(succ, axis=1)[:, :-1]).all()  # distinct
    per_topic = np.bincount(t.item_topic[1:], weights=t.popularity[1:])
    np.testing.assert_allclose(per_topic, 1.0)
    np.testing.assert_allclose(t.successor_probs.sum(), 1.0)


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_write_synthetic_round_trips(tmp_path, fmt: str) -> None:
    path = tmp_path / f"log.{fmt}"
    n = write_synthetic(path, fmt=fmt, n_users=100, seed=4)
    back = pl.read_parquet(path) if fmt == "parquet" else pl.read_csv(path)
    expected = synthetic_log(n_users=100, seed=4)
    assert n == expected.height
    assert back.equals(expected)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind


@pytest.mark.parametrize(
    "kw",
    [
        {"n_items": 20, "n_topics": 10},  # 2 items per topic < n_successors + 1
        {"sessions_per_user": (3, 2)},
        {"sequential": 1.5},
        {"taste_alpha": 0.0},
    ],
)
def test_bad_parameters_are_config_errors(kw: dict) -> None:
    with pytest.raises(ConfigError):
        synthetic_log(**kw)


def test_instacart_sample_path() -> None:
    path = instacart_sample_path()
    assert path.is_file() and path.name == "df_sample.csv"
    with path.open() as f:
        header = f.readline()
    assert header.startswith(",order_id,user_id,order_number,")
