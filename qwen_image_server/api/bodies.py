"""Reading an edit request's body: multipart/form-data with files, or JSON with base64 images.

Only the bytes are read here (on the event loop: no decoding); `Generation.read_edit_inputs`
decodes and checks them on the CPU pool.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import Request, UploadFile
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from qwen_image_server import errors
from qwen_image_server.protocol.native import EditForm, EditParameters, EditRequest
from qwen_image_server.serving.uploads import Upload, field_names

FORM = "multipart/form-data"
JSON = "application/json"


async def read_files(files: Sequence[UploadFile], name: str) -> list[Upload]:
    return [Upload(field, await file.read()) for field, file in zip(field_names(len(files), name), files, strict=True)]


def validated(model: type[BaseModel], data: Any) -> Any:
    """`model` validated from `data`; a failure answers 400 naming the field, like FastAPI's."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]) from exc


async def read_native_edit(request: Request) -> tuple[EditParameters, list[Upload], Upload | None]:
    """/edit's body, whichever way it came: the parameters, the images and the mask."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == FORM:
        form = await request.form()
        data: dict[str, Any] = {key: value for key, value in form.multi_items()
                                if key not in ("image", "image[]")}
        data["image"] = form.getlist("image")
        data["image[]"] = form.getlist("image[]")
        body: EditForm = validated(EditForm, data)
        files = [*body.image, *body.image_list]
        mask = Upload("mask", await body.mask.read()) if body.mask is not None else None
        return body, await read_files(files, "image"), mask
    if media_type == JSON or media_type.endswith("+json"):
        try:
            json_body = EditRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            raise RequestValidationError(
                [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]) from exc
        names = field_names(len(json_body.images), "images")
        images = [Upload(name, text) for name, text in zip(names, json_body.images, strict=True)]
        mask = Upload("mask", json_body.mask) if json_body.mask is not None else None
        return json_body, images, mask
    raise errors.InvalidRequest(
        f"Send the edit as {FORM} (image files) or {JSON} (base64 images); it came as "
        f"{media_type or 'no Content-Type'}.", param="body", code="unsupported_media_type")


# The request body /edit documents (it reads it itself, to take both kinds).
NATIVE_EDIT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            FORM: {"schema": EditForm.model_json_schema(by_alias=True)},
            JSON: {"schema": EditRequest.model_json_schema()},
        },
    }
}
