"""`trustswarm api`: an OpenAI-compatible HTTP API over the swarm (Starlette + uvicorn).

Modules: `errors` (OpenAI-style error JSON), `schemas` (request validation),
`generation` (token-by-token decoding through an inference session, in a worker
thread), `responses` (OpenAI response and chunk shapes), `app` (the Starlette app),
`cli` (the subcommand).
"""
