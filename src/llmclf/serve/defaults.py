"""`llmclf serve`'s defaults, defined once: the CLI's options, `create_app` and `uvicorn_config` use them.

A module of its own, free of FastAPI and uvicorn, so that the CLI reads them without importing the server."""

MAX_BATCH = 32  # texts per forward pass
MAX_WAIT_MS = 2.0  # how long a batch waits for more requests once one arrives
QUEUED_BATCHES = 64  # texts allowed to wait for inference: this many batches (--max-queue)
MAX_TEXTS = 256  # texts per request
MAX_CHARS = 100_000  # characters per text
MAX_BODY_BYTES = 1 << 20
MAX_MC_PASSES = 50
MAX_EXPLAIN_TEXTS = 8  # texts per request with "explain": true (each costs EXPLAIN_STEPS forward+backward passes)
EXPLAIN_STEPS = 32  # integrated gradients' integration points for the server's explanations
MAX_HEADER_BYTES = 16 * 1024  # request line and headers together
MAX_CONNECTIONS = 256
KEEP_ALIVE_TIMEOUT = 5.0  # seconds an idle keep-alive connection stays open
REQUEST_TIMEOUT = 30.0  # seconds a connection has to deliver a complete request
SHUTDOWN_TIMEOUT = 30.0  # seconds requests in flight have to finish on SIGTERM/SIGINT
