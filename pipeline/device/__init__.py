"""The device agent's server side: an HTTP service that runs on the target and measures models
there.

`serve` starts it (`pipeline device serve`) on uvicorn with the connection limits and read
deadlines of `guard`; `server` is the app (FastAPI), `bounds` the limits on a request's numbers,
`jobs` runs each job in a child process, `workdir` keeps the job folders, `probe` describes the
board. The host's side (`pipeline.measure.device_client`, `pipeline.measure.device_protocol`)
backs `pipeline.measure.runners.remote.RemoteRunner`; nothing here is imported by
`pipeline.measure.runners`, so FastAPI is only needed when used.
"""
