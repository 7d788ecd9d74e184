"""Shared contract of the gateway and the workers: wire models, job and frame models,
Redis key names and connections (direct or through Sentinel), settings and errors. A leaf:
it imports neither `gateway` nor `workers`, and nothing heavy, so every process can load it
cheaply."""
