"""Asking an endpoint (ours, or anything speaking the same JSON) for predictions, with the standard library."""

from __future__ import annotations

import json
import mimetypes
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from imgtune.core.errors import ImgtuneError

CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}


def content_type_of(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    return CONTENT_TYPES.get(suffix) or mimetypes.guess_type(str(path))[0] or "application/x-image"


class EndpointClient:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 60.0):
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    def invoke(self, body: bytes, content_type: str, top_k: int = 5, logits: bool = False) -> dict[str, Any]:
        """POST /invocations; the endpoint's JSON answer.

        Raises:
            ImgtuneError: the endpoint refused the request (its message), or could not be reached.
        """
        query = f"?top_k={top_k}" + ("&logits=true" if logits else "")
        request = urllib.request.Request(
            f"{self.url}/invocations{query}", data=body, method="POST", headers={"Content-Type": content_type}
        )
        if self.api_key:
            request.add_header("X-API-Key", self.api_key)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                message = json.loads(raw)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = raw.decode(errors="replace")[:300] or exc.reason
            raise ImgtuneError(f"the endpoint answered {exc.code}: {message}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ImgtuneError(f"cannot reach {self.url}: {reason}", "is `imgtune deploy` running there?") from None

    def predict_file(self, path: str | Path, top_k: int = 5) -> list[dict[str, Any]]:
        """The top-k classes of one image file."""
        answer = self.invoke(Path(path).read_bytes(), content_type_of(path), top_k)
        return answer["predictions"][0]["classes"]
