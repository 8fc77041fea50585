"""The OpenAI Images API in front of the Triton server (issue 22).

    python -m flux2_serving.front --triton-grpc 127.0.0.1:8001          # http://127.0.0.1:9000/v1

An ASGI service (Starlette on uvicorn) that translates POST /v1/images/generations and
/v1/images/edits, as the official `openai` client sends them, into requests to the
`flux2_klein_kv` BLS over gRPC, and Triton's answers back into OpenAI's responses and error
shape. Triton and the BLS are unchanged; the front holds no model, so it runs and scales apart
from the GPU replicas. Modules: app (the routes and settings), fields (an OpenAI request -> the
BLS's inputs), body (bounded bodies), triton (the gRPC client), response (images -> ImagesResponse),
errors (OpenAI's error shape, Triton's answers mapped), middleware (request ids, keys, metrics,
logs), metrics, store (response_format=url), serve (a front as a subprocess, for tests and
benchmarks), __main__ (the command).
"""
