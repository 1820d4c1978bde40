"""Latency measurement: the runners, benchmarking, the measuring worker process, the latency
model, and the client side of the device agent."""
