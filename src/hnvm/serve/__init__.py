"""`hnvm serve`: HTTP over the online engine (`hnvm.online`) and the durable event log.

    app.py      the FastAPI app (`create_app`) and the process (`serve`)
    schemas.py  request / response models and size limits
    service.py  `Service`: engine + event log, the event writer and the recommendation batcher
    asgi.py     the ASGI middlewares (body limit, recommend fast path)
    store.py    `EventLog`: the durable SQLite event log
"""
