"""One router per resource. The OpenAI surface (`chat`, `completions`, `embeddings`,
`models`, `files`, `batches`) and Corral's own (`requests`, `queue`, `management`,
`workers`, `health`, `metrics`, `telemetry`), and the status page (`ui`)."""
