"""The OpenAI-compatible frontend (rank 0).

- `protocol`: request parsing/validation → SamplingParams; response and SSE builders.
- `media`: image / embeddings inputs: safe fetch (SSRF, caps, redirects), decode, checks.
- `engine_client`: `EngineClient` (what the frontend calls) and `LocalEngineClient`.
- `metrics`: Prometheus text.
- `app`: aiohttp routes, `build_app`, `serve`, `run_local`, `ServerThread`.
"""
