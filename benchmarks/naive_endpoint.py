"""The baseline endpoint for benchmarks/serving_throughput.py: what the original project's inference script did.

One PyTorch forward per request (no batching), in eval mode under no_grad, on the request's single image,
answering its raw logits; FastAPI runs each request in its thread pool, as a model server's handlers would.
It serves the same model bundle as `imgtune deploy`, so only the serving strategy differs.

    python benchmarks/naive_endpoint.py BUNDLE_DIR --port 28090
"""

from __future__ import annotations

import argparse
import io

import torch
import uvicorn
from fastapi import FastAPI, Request
from PIL import Image
from starlette.concurrency import run_in_threadpool

from imgtune.models.bundle import load_bundle


def create_app(bundle_dir: str) -> FastAPI:
    bundle = load_bundle(bundle_dir)  # model_fn
    model = bundle.model.eval()
    transform = bundle.preprocessing.eval_transform()
    app = FastAPI()

    def predict(data: bytes) -> list[float]:
        image = Image.open(io.BytesIO(data)).convert("RGB")  # input_fn
        with torch.no_grad():  # predict_fn: one image, one forward
            logits = model(transform(image).unsqueeze(0))
        return logits[0].tolist()  # output_fn: the raw logits

    @app.get("/ping")
    def ping() -> dict:
        return {"status": "ready"}

    @app.post("/invocations")
    async def invocations(request: Request) -> list[float]:
        return await run_in_threadpool(predict, await request.body())

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("--port", type=int, default=28090)
    args = parser.parse_args()
    uvicorn.run(create_app(args.bundle), host="127.0.0.1", port=args.port, log_level="warning")
