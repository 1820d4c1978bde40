"""The device agent: an HTTP service that runs on the target and measures models there.

`server` (FastAPI + uvicorn) runs on the device (`pipeline device serve`); `client` talks to it
from the host and backs `pipeline.runners.remote.RemoteRunner`. Nothing here is imported by
`pipeline.runners` until a profile names a remote device, so FastAPI is only needed when used.
"""
