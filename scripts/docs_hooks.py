"""MkDocs hooks (mkdocs.yml `hooks:`): the pages that describe code are generated from it at every
build, so they cannot drift from it.

- `<!-- generated: settings -->` becomes a table of every field of the settings object
  (qwen_image_server/config/settings.py): its variable, its flag, its type, default and description.
- `<!-- generated: openapi -->` becomes the reference of every route, from the app's OpenAPI
  document; the document itself is written to the site as `openapi.json`.
"""

from __future__ import annotations

import json
import re
import tempfile
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, SecretStr
from pydantic.fields import FieldInfo

ROOT = Path(__file__).resolve().parent.parent
SETTINGS_MARK = "<!-- generated: settings -->"
OPENAPI_MARK = "<!-- generated: openapi -->"


# -- settings ------------------------------------------------------------------------------------

def env_name(name: str, field: FieldInfo) -> str:
    """The environment variable a setting is read from (the seed's bare names keep theirs)."""
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        bare = [choice for choice in alias.choices if isinstance(choice, str) and choice.isupper()]
        if bare:
            return bare[0]
    return "QWEN_IMAGE_" + name.upper()


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def type_name(annotation: Any) -> str:
    """A short, readable type: `auto | none | model`, `int`, `list of str`, ..."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is typing.Literal:
        return " \\| ".join(f"`{arg}`" for arg in args)
    if origin in (typing.Union, types.UnionType):
        parts = [type_name(arg) for arg in args if arg is not type(None)]
        return " or ".join(dict.fromkeys(parts))
    if origin is list:
        return "comma-separated " + type_name(args[0]) if args else "list"
    if origin is dict:
        return "JSON object"
    if annotation is SecretStr:
        return "secret string"
    if isinstance(annotation, type):
        if annotation.__module__ == "builtins":
            return {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}.get(
                annotation.__name__, annotation.__name__)
        return {"Path": "path", "HttpUrl": "http(s) URL", "AnyUrl": "URL"}.get(annotation.__name__, annotation.__name__)
    text = str(annotation)
    if "Url" in text:
        return "URL (`s3://`, `file://`)"
    return text.replace("typing.", "")


def default_text(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value: Any = field.default_factory()  # type: ignore[call-arg]
    else:
        value = field.default
    if value is None or value == "" or value == [] or value == {}:
        return "–"
    if isinstance(value, bool):
        return "`1`" if value else "`0`"
    if isinstance(value, list):
        return "`" + ",".join(str(item) for item in value) + "`"
    if isinstance(value, Path):
        text = str(value)
        home = str(Path.home())
        return "`" + ("~" + text[len(home):] if text.startswith(home) else text) + "`"
    return f"`{value}`"


def setting_sections() -> dict[str, str]:
    """Each field's section, from the `# -- title ---` comments of settings.py."""
    source = (ROOT / "qwen_image_server" / "config" / "settings.py").read_text()
    sections, current = {}, "Settings"
    for line in source.splitlines():
        title = re.match(r"^    # -- (.+?)(?: \(.*\))?(?: -+)?\s*$", line)
        if title:
            current = title.group(1).strip(" -")
            current = current[0].upper() + current[1:]
            continue
        field = re.match(r"^    ([a-z_][a-z0-9_]*): ", line)
        if field:
            sections.setdefault(field.group(1), current)
    return sections


def cell(text: str) -> str:
    """Prose for one table cell: one line; outside `code`, nothing Markdown or HTML would eat."""
    parts = " ".join(text.split()).split("`")
    for i in range(0, len(parts), 2):  # the even parts are outside code spans
        parts[i] = (parts[i].replace("\\", "\\\\").replace("*", "\\*").replace("_", "\\_")
                    .replace("<", "&lt;").replace(">", "&gt;"))
    return "`".join(parts).replace("|", "\\|")


def settings_markdown() -> str:
    from qwen_image_server.config.settings import SECRET_SETTINGS, Settings

    sections = setting_sections()
    by_section: dict[str, list[str]] = {}
    for name, field in Settings.model_fields.items():
        secret = " (a secret: never logged or shown)" if name in SECRET_SETTINGS else ""
        row = (f"| `{env_name(name, field)}` | `{flag_name(name)}` | {type_name(field.annotation)} | "
               f"{default_text(field)} | {cell(field.description or '')}{secret} |")
        by_section.setdefault(sections.get(name, "Settings"), []).append(row)
    out = []
    for section, rows in by_section.items():
        out += [f"### {section}", "", "| Variable | Flag | Type | Default | Description |",
                "|---|---|---|---|---|", *rows, ""]
    return "\n".join(out)


# -- OpenAPI -------------------------------------------------------------------------------------

@cache
def openapi_document() -> dict[str, Any]:
    """The app's OpenAPI document, as `GET /openapi.json` answers it (no model is loaded)."""
    from qwen_image_server.api.app import create_app
    from qwen_image_server.config.settings import Settings

    with tempfile.TemporaryDirectory() as folder:
        settings = Settings(_env_file=None, model="tiny", host="127.0.0.1", output_dir=Path(folder) / "out",
                            data_dir=Path(folder) / "data")
        return create_app(settings).openapi()


def resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        *_, name = schema["$ref"].split("/")
        schema = doc["components"]["schemas"][name]
    return schema


def schema_type(doc: dict[str, Any], schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    if "enum" in schema:
        return " \\| ".join(f"`{value}`" for value in schema["enum"])
    if "const" in schema:
        return f"`{schema['const']}`"
    for key in ("anyOf", "oneOf"):
        if key in schema:
            parts = [schema_type(doc, part) for part in schema[key] if part.get("type") != "null"]
            return " or ".join(dict.fromkeys(parts)) or "null"
    kind = schema.get("type", "any")
    if kind == "array":
        return f"list of {schema_type(doc, schema.get('items', {}))}"
    return str(kind)


def limits(schema: dict[str, Any]) -> str:
    names = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<",
             "minLength": "length >=", "maxLength": "length <=", "minItems": "items >=", "maxItems": "items <="}
    def number(value: float) -> str:
        return str(int(value)) if float(value).is_integer() else str(value)

    found = [f"{word} {number(schema[key])}" for key, word in names.items() if key in schema]
    for part in schema.get("anyOf", []):
        found += [f"{word} {number(part[key])}" for key, word in names.items() if key in part]
    return ", ".join(found)


def fields_table(doc: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    schema = resolve(doc, schema)
    properties = schema.get("properties", {})
    if not properties:
        return [f"Body: {schema_type(doc, schema)}.", ""]
    required = set(schema.get("required", []))
    rows = ["| Field | Type | Default | Limits | Description |", "|---|---|---|---|---|"]
    for name, prop in properties.items():
        default = "**required**" if name in required else (
            cell(f"`{json.dumps(prop['default'])}`") if "default" in prop else "–")
        rows.append(f"| `{name}` | {schema_type(doc, prop)} | {default} | {limits(prop)} | "
                    f"{cell(prop.get('description', ''))} |")
    return rows + [""]


def openapi_markdown() -> str:
    doc = openapi_document()
    out = [f"The server's OpenAPI {doc['openapi']} document: <a href='../openapi.json'><code>openapi.json</code></a> "
           f"(a running server also answers it at `/openapi.json`, and renders it at `/docs`). "
           f"{doc['info']['title']} {doc['info']['version']}.", ""]
    for path, methods in doc["paths"].items():
        for method, operation in methods.items():
            out += [f"### `{method.upper()} {path}`", ""]
            if operation.get("summary"):
                out += [f"**{cell(operation['summary'])}**", ""]
            if operation.get("description"):
                out += [operation["description"].strip(), ""]
            parameters = operation.get("parameters", [])
            if parameters:
                out += ["| Parameter | In | Type | Required | Description |", "|---|---|---|---|---|"]
                out += [f"| `{p['name']}` | {p['in']} | {schema_type(doc, p.get('schema', {}))} | "
                        f"{'yes' if p.get('required') else 'no'} | {cell(p.get('description', ''))} |"
                        for p in parameters]
                out.append("")
            for media, body in operation.get("requestBody", {}).get("content", {}).items():
                out += [f"Request body (`{media}`):", ""] + fields_table(doc, body.get("schema", {}))
            codes = ", ".join(f"`{code}` {cell(answer.get('description', ''))}"
                              for code, answer in operation.get("responses", {}).items())
            if codes:
                out += [f"Responses: {codes}.", ""]
    out += ["## Schemas", "", "The objects the routes above name, as the document defines them.", ""]
    for name, schema in doc["components"]["schemas"].items():
        out += [f"### {name}", ""]
        if schema.get("description"):
            out += [cell(schema["description"]), ""]
        out += fields_table(doc, schema)
    return "\n".join(out)


# -- hooks ---------------------------------------------------------------------------------------

def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if SETTINGS_MARK in markdown:
        markdown = markdown.replace(SETTINGS_MARK, settings_markdown())
    if OPENAPI_MARK in markdown:
        markdown = markdown.replace(OPENAPI_MARK, openapi_markdown())
    return markdown


def on_post_build(config: Any) -> None:
    site = Path(config["site_dir"])
    (site / "openapi.json").write_text(json.dumps(openapi_document(), indent=2) + "\n")
