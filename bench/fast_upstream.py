"""A deliberately trivial mTLS upstream for bench/gateway_overhead.py: it answers the core server's
search route at once, so what the benchmark measures is the gateway's own cost (mTLS, identity, RBAC,
rate limiting, audit), not retrieval. Not a stand-in for the core server anywhere else.

    python bench/fast_upstream.py --port P --cert C --key K --ca CA
"""

from __future__ import annotations

import argparse
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from runtime.common.tls import TlsFiles, uvicorn_tls_kwargs

app = FastAPI()


@app.post("/internal/search")
async def search() -> dict[str, object]:
    return {"results": [], "departments": []}


@app.get("/readyz")
async def readyz() -> dict[str, str]:
    return {"status": "ready"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--ca", type=Path, required=True)
    args = parser.parse_args()
    tls = uvicorn_tls_kwargs(TlsFiles(cert=args.cert, key=args.key, ca=args.ca))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", **tls)


if __name__ == "__main__":
    main()
