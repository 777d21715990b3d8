"""The OpenAPI schema `cog build` writes to .cog/openapi_schema.json for predict.py, made the way Cog's CLI makes
it: from Cog's static parse of predict.py (script/cog_parse.py), never importing it.

The Cog server (coglet) validates requests against that file only, and serves it at /openapi.json. The document
follows replicate/cog's pkg/schema/openapi_spec.go at 6110c91 (buildOpenAPISpec, buildInputSchema): `nullable` for
`X | None`, a None default kept only on nullable inputs, choices as an enumeration component named after the input.
`silent_changes` lists what Cog's parse drops or changes against what Python sees when it imports predict.py.

    python script/openapi_schema.py [predict.py:Predictor] > .cog/openapi_schema.json
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a file, not as a module

from script.cog_parse import (  # noqa: E402
    DEFAULT_PREDICTOR,
    ROOT,
    UNSET,
    CogPredictor,
    read_predictor,
    split_ref,
)

COG_VERSION = "0.23.1"  # info.version: the Cog release the schema is written for (requirements-dev.txt's cog)
STATUSES = ["starting", "processing", "succeeded", "canceled", "failed"]


def _json_number(value: Any) -> Any:
    """A value as Go's encoding/json writes it: a float64 with no fraction (below 1e21) has no ".0"."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer() and abs(value) < 1e21:
        return int(value)
    if isinstance(value, list):
        return [_json_number(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_number(v) for k, v in value.items()}
    return value


def _title(name: str) -> str:  # TitleCase: split on "_", capitalise each part's first letter
    return " ".join(p[:1].upper() + p[1:] for p in name.split("_"))


def input_schema(predictor: CogPredictor) -> tuple[dict, dict[str, dict]]:
    """buildInputSchema: (Input, {enumeration name: schema})."""
    properties: dict[str, dict] = {}
    enums: dict[str, dict] = {}
    required = []
    for i in predictor.inputs:
        prop: dict = {"x-order": i.order}
        if i.choices is not UNSET and i.choices:
            enums[i.name] = {
                "title": i.name,
                "description": "An enumeration.",
                "enum": _json_number(i.choices),
                "type": i.type.primitive_json.get("type") or "string",
            }
            prop["allOf"] = [{"$ref": f"#/components/schemas/{i.name}"}]
        else:
            prop["title"] = _title(i.name)
            prop.update(i.type.json())
        nullable = i.type.nullable or i.type.repetition in ("optional", "optional_repeated")
        if i.type.kind == "primitive" and i.type.primitive == "Secret" and i.default is None:
            nullable = True
        has_default = i.default is not UNSET and (i.default is not None or nullable)
        if not has_default and (i.type.kind == "union" or i.type.repetition in ("required", "repeated")):
            required.append(i.name)
        if has_default:
            prop["default"] = _json_number(i.default)
        if nullable:
            prop["nullable"] = True
        for key, json_key in [
            ("description", "description"),
            ("ge", "minimum"),
            ("le", "maximum"),
            ("min_length", "minLength"),
            ("max_length", "maxLength"),
            ("regex", "pattern"),
        ]:
            value = getattr(i, key)
            if value is not UNSET:
                prop[json_key] = _json_number(value)
        if i.deprecated is True:
            prop["deprecated"] = True
        properties[i.name] = prop
    schema = {"title": "Input", "type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema, enums


def _json_response(schema: dict, description: str = "Successful Response") -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def openapi_document(predictor: CogPredictor) -> dict:
    """buildOpenAPISpec for a predictor (not a trainer)."""
    inputs, enums = input_schema(predictor)
    validation_error = _json_response(_ref("HTTPValidationError"), "Validation Error")
    date_time = {"type": "string", "format": "date-time"}
    schemas = {
        "Input": inputs,
        "Output": predictor.output,
        **enums,
        "PredictionRequest": {
            "title": "PredictionRequest",
            "type": "object",
            "properties": {"id": {"title": "Id", "type": "string"}, "input": _ref("Input")},
        },
        "PredictionResponse": {
            "title": "PredictionResponse",
            "type": "object",
            "properties": {
                "input": _ref("Input"),
                "output": _ref("Output"),
                "id": {"title": "Id", "type": "string"},
                "version": {"title": "Version", "type": "string"},
                "created_at": {"title": "Created At", **date_time},
                "started_at": {"title": "Started At", **date_time},
                "completed_at": {"title": "Completed At", **date_time},
                "status": {"title": "Status", "type": "string"},
                "error": {"title": "Error", "type": "string"},
                "logs": {"title": "Logs", "type": "string"},
                "metrics": {"title": "Metrics", "type": "object"},
            },
        },
        "Status": {"title": "Status", "description": "An enumeration.", "enum": STATUSES, "type": "string"},
        "HTTPValidationError": {
            "title": "HTTPValidationError",
            "type": "object",
            "properties": {"detail": {"title": "Detail", "type": "array", "items": _ref("ValidationError")}},
        },
        "ValidationError": {
            "title": "ValidationError",
            "required": ["loc", "msg", "type"],
            "type": "object",
            "properties": {
                "loc": {
                    "title": "Location",
                    "type": "array",
                    "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                },
                "msg": {"title": "Message", "type": "string"},
                "type": {"title": "Error Type", "type": "string"},
            },
        },
    }
    any_json = _json_response({})
    paths = {
        "/": {"get": {"summary": "Root", "operationId": "root__get", "responses": {"200": any_json}}},
        "/health-check": {
            "get": {
                "summary": "Healthcheck",
                "operationId": "healthcheck_health_check_get",
                "responses": {"200": any_json},
            }
        },
        "/predictions": {
            "post": {
                "summary": "Predict",
                "description": "Run a single prediction on the model",
                "operationId": "predict_predictions_post",
                "requestBody": {"content": {"application/json": {"schema": _ref("PredictionRequest")}}},
                "responses": {"200": _json_response(_ref("PredictionResponse")), "422": validation_error},
            }
        },
        "/predictions/{prediction_id}/cancel": {
            "post": {
                "summary": "Cancel",
                "operationId": "cancel_predictions__prediction_id__cancel_post",
                "parameters": [
                    {
                        "required": True,
                        "schema": {"title": "Prediction Id", "type": "string"},
                        "name": "prediction_id",
                        "in": "path",
                    }
                ],
                "responses": {"200": any_json, "422": validation_error},
            }
        },
    }
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": COG_VERSION},
        "paths": paths,
        "components": {"schemas": schemas},
    }


def build_schema(predictor_ref: str = DEFAULT_PREDICTOR) -> dict:
    """The document `cog build` writes for the predictor (see the module docstring)."""
    return openapi_document(read_predictor(predictor_ref))


# ---- what Cog would change silently ----------------------------------------------------------------------


def _same(cog: Any, python: Any) -> bool:
    if isinstance(cog, bool) or isinstance(python, bool):
        return type(cog) is type(python) and cog == python
    if isinstance(cog, list) and isinstance(python, (list, tuple)):
        return len(cog) == len(python) and all(_same(a, b) for a, b in zip(cog, python, strict=True))
    return cog == python  # exact between int and float: 2.0**63 is not 2**63 - 1


def silent_changes(predictor_ref: str = DEFAULT_PREDICTOR, cog: CogPredictor | None = None) -> list[str]:
    """Every Input() keyword whose value in the schema Cog builds differs from the value Python sees when it
    imports the predictor ([] when they all agree). Imports the predictor module."""
    path, class_name = split_ref(predictor_ref)
    cog = cog or read_predictor(predictor_ref)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # predict.py imports the project's packages
    spec = importlib.util.spec_from_file_location(f"_predictor_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    predictor = getattr(module, class_name)
    method = getattr(predictor, "run", None) or predictor.predict
    params = {n: p.default for n, p in inspect.signature(method).parameters.items() if n != "self"}
    found = {i.name: i for i in cog.inputs}
    changes = [f"{name}: Cog does not see this input" for name in params if name not in found]
    for name, declared in params.items():
        if name not in found:
            continue
        cog_input = found[name]
        if declared is inspect.Parameter.empty:
            declared_values = {"default": UNSET}
        elif type(declared).__name__ == "FieldInfo":
            declared_values = {
                key: getattr(declared, key)
                for key in ("default", "description", "ge", "le", "min_length", "max_length", "regex", "choices")
            }
            declared_values["deprecated"] = declared.deprecated
        else:
            declared_values = {"default": declared}
        for key, python in declared_values.items():
            value = getattr(cog_input, key)
            if python is None and value is UNSET:
                continue  # not given, and not read
            if value is UNSET:
                changes.append(f"{name}: {key}={python!r} is dropped by Cog's parser (write it as a literal)")
            elif not _same(value, python):
                changes.append(f"{name}: {key} is {python!r} in Python but {value!r} in the schema Cog builds")
    return changes


if __name__ == "__main__":
    print(json.dumps(build_schema(*sys.argv[1:2]), indent=2))
