"""Reading an edit request's body: multipart/form-data with files, or JSON with base64 images.

Only the bytes are read here (on the event loop: no decoding); `Generation.read_edit_inputs`
decodes and checks them on the CPU pool.
"""

from __future__ import annotations

import base64
from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile as StarletteUpload

from qwen_image_server import errors
from qwen_image_server.protocol.common import ControlFields, UploadFields, json_list
from qwen_image_server.protocol.native import (
    EditForm,
    EditJobForm,
    EditJobParameters,
    EditJobRequest,
    EditParameters,
    EditRequest,
    LayeredJobForm,
    LayeredJobParameters,
)
from qwen_image_server.serving.uploads import Upload, field_names

FORM = "multipart/form-data"
JSON = "application/json"
M = TypeVar("M", bound=BaseModel)


async def read_uploads(form: UploadFields) -> tuple[list[Upload], Upload | None]:
    """A multipart form's images and mask, read and then closed (no decoding here: the CPU pool
    does that). Starlette keeps a part over 1 MiB in a temporary file: closing it now frees its
    descriptor and its disk space while the request goes on (an OpenAI stream lasts as long as
    its images take)."""
    files = [*form.images, *([form.mask] if form.mask is not None else [])]
    try:
        names = field_names(len(form.images), "image")
        images = [Upload(name, await file.read()) for name, file in zip(names, form.images, strict=True)]
        mask = Upload("mask", await form.mask.read()) if form.mask is not None else None
    finally:
        for file in files:
            await file.close()
    return images, mask


def validated(model: type[M], data: dict[str, Any] | bytes) -> M:
    """`model` validated from form fields or JSON bytes; a failure answers 400 naming the field,
    as FastAPI's own body validation does."""
    try:
        return model.model_validate_json(data) if isinstance(data, bytes) else model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]) from exc


F = TypeVar("F", bound=UploadFields)


async def _read_upload_form(request: Request, form_model: type[F]) -> tuple[F, list[Upload], Upload | None]:
    """A multipart body: its fields validated as `form_model`, its images' and mask's bytes.
    Every file part (those of unknown fields too) is closed before the request goes on: nothing
    that outlives it (a job's record) may hold a temporary file open."""
    form = await request.form()
    try:
        data: dict[str, Any] = {key: value for key, value in form.multi_items() if key not in ("image", "image[]")}
        data["image"] = form.getlist("image")
        data["image[]"] = form.getlist("image[]")
        body = validated(form_model, data)
        images, mask = await read_uploads(body)
    finally:
        await form.close()
    return body, images, mask


async def read_native_edit(request: Request) -> tuple[EditParameters, list[Upload], Upload | None]:
    """/edit's body, whichever way it came: the parameters (without the images), the images'
    bytes and the mask's."""
    return await _read_edit(request, EditForm, EditRequest)


async def read_edit_job(request: Request) -> tuple[EditJobParameters, list[Upload], Upload | None]:
    """/v1/jobs/edit's body, as `read_native_edit` reads /edit's (the same, plus a webhook)."""
    body, images, mask = await _read_edit(request, EditJobForm, EditJobRequest)
    assert isinstance(body, EditJobParameters), "an edit job's form and JSON body give its parameters"
    return body, images, mask


async def _read_edit(request: Request, form_model: type[EditForm], json_model: type[EditRequest],
                     ) -> tuple[EditParameters, list[Upload], Upload | None]:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == FORM:
        form_body, images, mask = await _read_upload_form(request, form_model)
        return form_body.parameters(), images, mask
    if media_type == JSON or media_type.endswith("+json"):
        json_body = validated(json_model, await request.body())
        names = field_names(len(json_body.images), "images")
        images = [Upload(name, text) for name, text in zip(names, json_body.images, strict=True)]
        mask = Upload("mask", json_body.mask) if json_body.mask is not None else None
        return json_body.parameters(), images, mask
    raise errors.InvalidRequest(
        f"Send the edit as {FORM} (image files) or {JSON} (base64 images); it came as "
        f"{media_type or 'no Content-Type'}.", param="body", code="unsupported_media_type")


# A generation's pictures, sent as multipart file parts: each is its base64 field of the JSON body.
GENERATION_FILE_PARTS = ("image", "mask", "control_image")
G = TypeVar("G", bound=ControlFields)


async def read_generation(request: Request, model: type[G]) -> G:
    """/generate's or /v1/jobs' body: JSON, or multipart/form-data. A form is the same body in
    another encoding: its file parts `image`, `mask` and `control_image` (repeated: one per
    ControlNet) stand for the base64 fields, its text parts for the others (a repeated one is a
    list; `loras` is JSON text), read as text (`"20"` steps) where JSON is strict."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == FORM:
        form = await request.form()
        data: dict[str, Any] = {}
        try:
            for key in dict.fromkeys(form.keys()):
                values = [base64.b64encode(await value.read()).decode() if isinstance(value, StarletteUpload)
                          else value for value in form.getlist(key)]
                data[key] = values[0] if len(values) == 1 else values
        finally:
            await form.close()
        if "loras" in data:
            data["loras"] = json_list(data["loras"])
        try:
            return model.model_validate(data, strict=False, context={"form": True})
        except ValidationError as exc:
            raise RequestValidationError(
                [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]) from exc
    raw = await request.body()
    if not raw.strip():
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required"}])
    if media_type and media_type != JSON and not media_type.endswith("+json"):
        # What FastAPI answers a JSON route sent another type (e.g. curl -d's form type).
        raise RequestValidationError([{"type": "model_attributes_type", "loc": ("body",),
                                       "msg": "Input should be a valid dictionary or object"}])
    return validated(model, raw)


def generation_body(model: type[BaseModel]) -> dict[str, Any]:
    """The request body a generation route documents: JSON, or the same fields as a multipart
    form with `image`, `mask` and `control_image` as file parts."""
    schema = model.model_json_schema()
    return {"requestBody": {"required": True, "content": {JSON: {"schema": schema}, FORM: {"schema": schema}}}}


async def read_layered_job(request: Request) -> tuple[LayeredJobParameters, list[Upload]]:
    """/v1/jobs/layers' body (multipart/form-data): the parameters and the picture's bytes."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != FORM:
        raise errors.InvalidRequest(
            f"Send the picture to split as {FORM} (the file `image`); it came as "
            f"{media_type or 'no Content-Type'}.", param="body", code="unsupported_media_type")
    body, images, _ = await _read_upload_form(request, LayeredJobForm)
    return body.parameters(), images


def edit_body(form_model: type[EditForm], json_model: type[EditRequest]) -> dict[str, Any]:
    """The request body an edit route documents (it reads it itself, to take both kinds)."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                FORM: {"schema": form_model.model_json_schema(by_alias=True)},
                JSON: {"schema": json_model.model_json_schema()},
            },
        }
    }


NATIVE_EDIT_BODY = edit_body(EditForm, EditRequest)
EDIT_JOB_BODY = edit_body(EditJobForm, EditJobRequest)
LAYERED_JOB_BODY = {"requestBody": {"required": True, "content": {
    FORM: {"schema": LayeredJobForm.model_json_schema(by_alias=True)}}}}
