"""Built-in models; importing this package registers them (each module calls `register`)."""

from hnvm.models import (  # noqa: F401
    bprmf,
    caser,
    gru4rec,
    hnvm,
    hrnn,
    itemknn,
    ncf,
    pop,
    ptopfreq,
    sknn,
    stamp,
    tifuknn,
)

BUILTIN = ("pop", "ptopfreq", "tifuknn", "itemknn", "sknn", "bprmf", "ncf", "gru4rec", "hrnn", "caser",
           "stamp", "hnvm")
