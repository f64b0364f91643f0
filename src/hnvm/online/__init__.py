"""Online recommendation from an event stream, independent of any transport: `hnvm serve`
(HTTP, `hnvm.serve`) and `hnvm recommend` (offline) both use it.

    sessions.py  session rules (`Track`), `UserState`, and the records: `Event`, `Query`,
                 `Recommendation`, `QueryError`, `Job`
    engine.py    `Engine`: a trained run's model, vocabularies and users' histories; applies
                 events, answers queries (prepare -> rank -> finish)
    scorers.py   user state -> scores: incremental for models with step-by-step inference
                 (HNVM), the model's own `score` / `score_sessions` for the rest
    ranking.py   top-k from scores or hidden states (`top_k`, `LinearRanker`, the certified
                 bf16 shortlist)
    worker.py    a child process that ranks (`RankWorker`)
"""

from hnvm.online.engine import Engine
from hnvm.online.scorers import AUTO_BF16_ITEMS, SCORING
from hnvm.online.sessions import DEFAULT_GAP_S, Event, Job, Query, QueryError, Recommendation, Track, UserState

__all__ = ["AUTO_BF16_ITEMS", "DEFAULT_GAP_S", "SCORING", "Engine", "Event", "Job", "Query", "QueryError",
           "Recommendation", "Track", "UserState"]
