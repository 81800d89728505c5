"""What an invocation asks for: its images (as bytes, not yet decoded) and its options, from any body the
endpoint accepts. Every refusal is a RequestError carrying the HTTP status and a reason for the client.

Bodies:
- `image/jpeg`, `image/png`, `application/x-image` (and other image/* types PIL reads): the raw image;
- `multipart/form-data`: every file part is an image (parsed by the app, which hands over the parts);
- `application/json`: `{"image": BASE64}`, `{"url": "s3://bucket/key"}`, or `{"instances": [...]}` where each
  instance is a base64 string, `{"image": BASE64}`, `{"b64": BASE64}` or `{"url": ...}`.

Options, from the JSON body, the query string or SageMaker's CustomAttributes header (`top_k=3,logits=true`):
`top_k` (default 5) and `logits` (also return the raw logits, as the original endpoint did).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

RAW_IMAGE_TYPES = frozenset(
    {"image/jpeg", "image/jpg", "image/png", "application/x-image", "image/webp", "image/bmp", "image/tiff"}
)
JSON_TYPE = "application/json"
MULTIPART_TYPE = "multipart/form-data"
ACCEPTED_TYPES = (*sorted(RAW_IMAGE_TYPES), JSON_TYPE, MULTIPART_TYPE)
CUSTOM_ATTRIBUTES = "x-amzn-sagemaker-custom-attributes"
MAX_INSTANCES = 64


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Options:
    top_k: int = 5
    logits: bool = False


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def parse_options(sources: list[dict[str, Any]], num_classes: int) -> Options:
    """top_k and logits from the first source that names them (body, query, CustomAttributes)."""
    options = Options(top_k=min(5, num_classes))
    for key in ("top_k", "logits"):
        value = next((source[key] for source in sources if source.get(key) not in (None, "")), None)
        if value is None:
            continue
        if key == "top_k":
            try:
                top = int(value)
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
            except (TypeError, ValueError, OverflowError):  # OverflowError: 1e400 is a float infinity
                raise RequestError(400, f"top_k must be a whole number, not {str(value)[:40]!r}") from None
            if not 1 <= top <= num_classes:
                raise RequestError(400, f"top_k must be between 1 and {num_classes} (the model's classes), not {top}")
            options.top_k = top
        else:
            if isinstance(value, bool):
                options.logits = value
            elif str(value).lower() in ("true", "1", "yes"):
                options.logits = True
            elif str(value).lower() in ("false", "0", "no"):
                options.logits = False
            else:
                raise RequestError(400, f"logits must be true or false, not {str(value)[:40]!r}")
    return options


def custom_attributes(header: str | None) -> dict[str, str]:
    """SageMaker's CustomAttributes header, `key=value` pairs separated by commas or semicolons."""
    pairs: dict[str, str] = {}
    for part in (header or "").replace(";", ",").split(","):
        key, sep, value = part.partition("=")
        if sep:
            pairs[key.strip()] = value.strip()
    return pairs


def decode_base64(text: Any, where: str) -> bytes:
    if not isinstance(text, str) or not text:
        raise RequestError(400, f"{where}: expected a base64 string")
    if text.startswith("data:") and "," in text:  # a data URL, as browsers make them
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"{where}: not valid base64") from None


def json_instances(body: bytes) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The instances of a JSON body (each {"image": bytes} or {"url": str}) and its top-level options."""
    try:
        document = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"the body is not valid JSON: {exc}") from None
    except RecursionError:  # [[[[...]]]] thousands deep: Python's parser gives up
        raise RequestError(400, "the JSON body is nested too deeply") from None
    if not isinstance(document, dict):
        raise RequestError(400, 'the JSON body must be an object: {"image": ...}, {"url": ...} or {"instances": [...]}')
    if "instances" in document:
        raw = document["instances"]
        if not isinstance(raw, list) or not raw:
            raise RequestError(400, '"instances" must be a non-empty list')
        if len(raw) > MAX_INSTANCES:
            raise RequestError(413, f"{len(raw)} instances in one request (at most {MAX_INSTANCES})")
    elif "image" in document or "url" in document or "b64" in document:
        raw = [document]
    else:
        raise RequestError(400, 'the JSON body needs "image" (base64), "url" or "instances"')
    instances = []
    for number, item in enumerate(raw, 1):
        where = f"instance {number}" if "instances" in document else "image"
        if isinstance(item, str):
            instances.append({"image": decode_base64(item, where)})
        elif isinstance(item, dict) and ("image" in item or "b64" in item):
            instances.append({"image": decode_base64(item.get("image", item.get("b64")), where)})
        elif isinstance(item, dict) and "url" in item:
            if not isinstance(item["url"], str):
                raise RequestError(400, f"{where}: url must be a string")
            instances.append({"url": item["url"]})
        else:
            raise RequestError(400, f'{where}: expected a base64 string, {{"image": ...}} or {{"url": ...}}')
    options = {k: document[k] for k in ("top_k", "logits") if k in document}
    return instances, options


def check_url(url: str, allowed_schemes: tuple[str, ...], allowed_buckets: tuple[str, ...] = ()) -> None:
    """Refuse a URL the server does not fetch: fetching is off unless a scheme (or a bucket) is allowed."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    schemes = set(allowed_schemes) | ({"s3"} if allowed_buckets else set())
    if scheme not in schemes:
        allowed = ", ".join(f"{s}://" for s in sorted(schemes)) or "none: this endpoint fetches no URL"
        raise RequestError(400, f"URL scheme {scheme or '(none)'!r} is not allowed (allowed: {allowed})")
    if scheme == "s3" and allowed_buckets and parts.netloc not in allowed_buckets:
        raise RequestError(400, f"bucket {parts.netloc[:64]!r} is not one this endpoint fetches from")


def fetch_url(url: str, max_bytes: int, timeout: float = 10.0) -> bytes:
    """An image named by an allowed URL (see check_url), at most `max_bytes`; any failure is one answer."""
    if max_bytes <= 0:
        raise RequestError(413, f"the request's images reach the payload limit before {url} is fetched")
    import fsspec

    options: dict[str, Any] = {}
    if urlsplit(url).scheme.lower() == "s3":  # botocore's own timeouts, and no retries past the deadline
        options["config_kwargs"] = {
            "connect_timeout": timeout, "read_timeout": timeout, "retries": {"max_attempts": 1}
        }  # fmt: skip
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
        size = fs.size(path)
        if size is not None and size > max_bytes:
            raise RequestError(413, f"{url} is {size:,} bytes (at most {max_bytes:,})")
        with fs.open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except RequestError:
        raise
    except Exception:  # one answer for every failure: it must not tell whether a key exists, or why not
        raise RequestError(400, f"could not fetch {url}") from None
    if len(data) > max_bytes:
        raise RequestError(413, f"{url} is over {max_bytes:,} bytes")
    return data
