"""Read a task request's fields from multipart form data or JSON into a :class:`~uio.requests.TaskRequest`.

Fields are named as the runner methods' arguments (``image``, ``question``, ``location`` or
``box``, ``answer_options``, ``binary_masks``, ``labels``...), listed by ``GET /v1/tasks``. In
JSON, images are base64 strings (a ``data:`` URL prefix is allowed), boxes and lists are JSON
arrays; in form data, images are files, boxes ``x1,y1,x2,y2`` and lists comma-separated or
repeated fields. Images are only ever read from the request's bytes, never from a path.
"""
from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable
from typing import Any

from starlette.datastructures import FormData, UploadFile

from .. import images
from ..requests import TaskRequest, task_arguments
from ..tasks import Arg

MAX_NUM_DECODES = 8  # a server-side bound: each decode is a beam (or sample) of work
ALIASES = {"location": ("box",)}


class FieldError(ValueError):
    """A field that is missing or cannot be read; the message names it."""


class Fields:
    """The fields of one request, from form data or a JSON object."""

    def __init__(self, data: FormData | dict):
        self.data, self.is_json = data, isinstance(data, dict)

    def _names(self, name: str) -> tuple[str, ...]:
        return (name, *ALIASES.get(name, ()))

    def get(self, name: str) -> tuple[str, Any]:
        """The name used and the value of field ``name`` (or an alias); value None when absent or empty."""
        for key in self._names(name):
            value = self.data.get(key)
            if value is not None and value != "":
                return key, value
        return name, None

    def get_list(self, name: str) -> tuple[str, list]:
        """Every value of field ``name``: a JSON array, repeated form fields, or one comma-separated field."""
        key, value = self.get(name)
        if value is None:
            return key, []
        if self.is_json:
            if not isinstance(value, list):
                raise FieldError(f"{key} must be a JSON array")
            return key, value
        values = self.data.getlist(key)
        if len(values) == 1 and isinstance(values[0], str):
            return key, [item.strip() for item in values[0].split(",") if item.strip()]
        return key, values


async def _bytes(key: str, value: Any, is_json: bool) -> bytes:
    """An uploaded file's bytes, or a base64 string's (JSON)."""
    if isinstance(value, UploadFile):
        return await value.read()
    if not isinstance(value, str):
        raise FieldError(f"{key} must be {'a base64 string' if is_json else 'a file'}")
    encoded = re.sub(r"^data:[\w/+.-]*;base64,", "", value.strip())
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise FieldError(f"{key} is not valid base64") from None


async def _image(fields: Fields, arg: Arg, read: Callable) -> dict:
    key, value = fields.get(arg.keyword)
    if value is None:
        if arg.optional:
            return {arg.keyword: None}
        raise FieldError(f"{arg.keyword} is missing: send an image file (or base64 in JSON)")
    data = await _bytes(key, value, fields.is_json)
    if not data:
        raise FieldError(f"{key} is empty (0 bytes)")
    return {arg.keyword: await read(images.read_image, data, key)}


def _text(fields: Fields, arg: Arg) -> dict:
    key, value = fields.get(arg.keyword)
    if value is None and arg.optional:
        return {arg.keyword: None}
    if not isinstance(value, str):
        raise FieldError(f"{key} is missing: give it as a string" if value is None else f"{key} must be a string")
    if not value.strip():
        raise FieldError(f"{key} is empty")
    return {arg.keyword: value}


def _number(text: Any, key: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise FieldError(f"{key} must be 4 numbers x1,y1,x2,y2 (pixels), got {str(text)[:40]!r}") from None
    if isinstance(text, bool):
        raise FieldError(f"{key} must be 4 numbers x1,y1,x2,y2 (pixels)")
    return value


def _box(fields: Fields, arg: Arg) -> dict:
    key, value = fields.get(arg.keyword)
    if value is None:
        raise FieldError(f"{arg.keyword} (or box) is missing: give 4 numbers x1,y1,x2,y2 in pixels of the image")
    if isinstance(value, str):
        value = json.loads(value) if value.strip().startswith("[") else re.split(r"[,\s]+", value.strip())
    if not isinstance(value, list) or len(value) != 4:
        raise FieldError(f"{key} must be 4 numbers x1,y1,x2,y2 (pixels)")
    return {arg.keyword: [_number(v, key) for v in value]}


def _options(fields: Fields, arg: Arg) -> dict:
    key, values = fields.get_list(arg.keyword)
    if not values:
        return {arg.keyword: None}
    if not all(isinstance(v, str) and v.strip() for v in values):
        raise FieldError(f"{key} must be non-empty strings")
    return {arg.keyword: [v.strip() for v in values]}


async def _masks(fields: Fields, arg: Arg, read: Callable) -> dict:
    key, values = fields.get_list(arg.keyword)
    if not fields.is_json:  # files: a comma split does not apply
        values = fields.data.getlist(key)
    if not values:
        raise FieldError(f"{arg.keyword} is missing: send one mask image per label")
    masks = [await read(images.read_mask, await _bytes(f"{key}[{i}]", v, fields.is_json), f"{key}[{i}]")
             for i, v in enumerate(values)]
    _, labels = fields.get_list("labels")
    if not labels or not all(isinstance(label, str) for label in labels):
        raise FieldError("labels is missing: give one label (a string) per mask")
    return {arg.keyword: masks, "labels": labels}


def _integer(fields: Fields, arg: Arg, maximum: int | None = None) -> dict:
    key, value = fields.get(arg.keyword)
    if value is None:
        return {arg.keyword: None}
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.isdigit())):
        raise FieldError(f"{key} must be a positive integer")
    value = int(value)
    if value < 1 or (maximum is not None and value > maximum):
        raise FieldError(f"{key} must be between 1 and {maximum}" if maximum else f"{key} must be at least 1")
    return {arg.keyword: value}


def _flag(fields: Fields, arg: Arg) -> dict:
    key, value = fields.get(arg.keyword)
    if value is None or isinstance(value, bool):
        return {arg.keyword: value}
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "on", "off"):
        return {arg.keyword: value.lower() in ("true", "1", "on")}
    raise FieldError(f"{key} must be true or false")


async def read_request(task: str, fields: Fields, read: Callable) -> TaskRequest:
    """The :class:`TaskRequest` for ``task`` from ``fields``; :class:`FieldError` (or the image
    reader's ValueError) naming the field when one is missing or unreadable.

    ``read(reader, data, name)`` runs an image reader of :mod:`uio.images` (off the event loop).
    """
    inputs: dict[str, Any] = {}
    for arg in task_arguments(task):
        if arg.kind == "image":
            inputs.update(await _image(fields, arg, read))
        elif arg.kind == "masks":
            inputs.update(await _masks(fields, arg, read))
        elif arg.kind == "integer":
            inputs.update(_integer(fields, arg, MAX_NUM_DECODES if arg.keyword == "num_decodes" else None))
        else:
            inputs.update({"text": _text, "box": _box, "options": _options, "flag": _flag}[arg.kind](fields, arg))
    num_decodes, beam_search = inputs.pop("num_decodes"), inputs.pop("beam_search")
    return TaskRequest(task, inputs, num_decodes, beam_search)
