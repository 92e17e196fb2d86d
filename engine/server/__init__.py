"""The engine replica server: one EngineCore in its own process behind an HTTP API.

`prefixgate engine --model PATH_OR_DEFAULT --port N` (serve.run) starts it. The API process
(litestar on uvicorn) owns asyncio and speaks HTTP; the core process (core_process.py) owns
the model and steps it. They exchange msgspec messages over two pipes (ipc.py), so neither
ever waits on the other's work.

Endpoints:
- POST /v1/chat/completions, POST /v1/completions, GET /v1/models: OpenAI-compatible
  (openai_types.py). Without max_tokens a request gets what fits in the context, capped at
  `default_max_tokens` (256). Usage always carries prompt_tokens_details.cached_tokens.
- POST /internal/generate: token ids in, per-step token ids / logprobs / finish reason out,
  no text (protocol.py). JSON or msgpack in; NDJSON out, or with `Accept: ...msgpack`
  msgpack frames each preceded by its length as 4 big-endian bytes.
- GET /kv/events: NDJSON, a CacheSnapshot then every KV event in sequence order.
- GET /health, /load, /metrics (Prometheus), /debug/cache (state and integrity check).

More than max_num_seqs + max_waiting engine requests in flight (n > 1 counts n) gets 429
with Retry-After. SIGTERM drains: new requests get 503, running ones finish.
"""
