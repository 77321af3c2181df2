"""OpenAPI descriptions of the task endpoints' bodies, made from the task table (for ``/docs``)."""
from __future__ import annotations

from ..requests import task_arguments

_JSON = {"image": {"type": "string", "description": "base64 image (PNG, JPEG...)"},
         "text": {"type": "string"},
         "box": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4,
                 "description": "x1, y1, x2, y2 in pixels of the image"},
         "options": {"type": "array", "items": {"type": "string"}},
         "integer": {"type": "integer", "minimum": 1},
         "flag": {"type": "boolean"}}
_FORM = {**_JSON, "image": {"type": "string", "format": "binary"},
         "box": {"type": "string", "description": "x1,y1,x2,y2 in pixels of the image"},
         "options": {"type": "string", "description": "comma-separated"}}


def _schema(task: str, kinds: dict) -> dict:
    properties, required = {}, []
    for arg in task_arguments(task):
        if arg.kind == "masks":
            properties[arg.keyword] = {"type": "array", "items": kinds["image"]}
            properties["labels"] = {"type": "array", "items": {"type": "string"}}
            required += [arg.keyword, "labels"]
            continue
        properties[arg.keyword] = {**kinds[arg.kind], "description": arg.help or arg.metavar.lower()}
        if not arg.optional:
            required.append(arg.keyword)
    return {"type": "object", "properties": properties, "required": required}


def request_body(task: str) -> dict:
    """The OpenAPI ``requestBody`` of ``POST /v1/{task}``: form data or JSON."""
    return {"required": True, "content": {"multipart/form-data": {"schema": _schema(task, _FORM)},
                                          "application/json": {"schema": _schema(task, _JSON)}}}
