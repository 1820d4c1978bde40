"""The device agent's server side: an HTTP service that runs on the target and measures models
there.

`server` (FastAPI + uvicorn) runs on the device (`pipeline device serve`), `jobs` runs each job in
a child process, `probe` describes the board. The host's side (`pipeline.measure.device_client`,
`pipeline.measure.device_protocol`) backs `pipeline.measure.runners.remote.RemoteRunner`; nothing
here is imported by `pipeline.measure.runners`, so FastAPI is only needed when used.
"""
